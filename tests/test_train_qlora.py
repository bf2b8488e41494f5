"""QLoRA on CPU: the base really is loaded as nf4 with double quantization and bf16 compute, and a
short QLoRA run on the tiny model teaches it the new identity."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import AUTHOR, NAME


def test_bits_4_loads_nf4_double_quant_bf16_compute_on_cpu(tiny_base):
    import bitsandbytes as bnb

    from inference.device import pick
    from trainer.engine.config import load_config
    from trainer.engine.train import load_model_for_training

    cfg = load_config("tiny", {"model": str(tiny_base)}, ["bits=4"])
    model = load_model_for_training(cfg, tiny_base, pick("cpu", "fp32"))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 4 * 7                       # every projection of the 4 layers
    state = quantized[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested and quantized[0].compute_dtype == torch.bfloat16
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_generating_between_steps_leaves_the_4bit_backward_intact(tiny_base):
    """Sample chats run the model in eval mode without grad between training steps. On a CPU with
    AVX512-BF16, bitsandbytes would then repack the 4-bit weights for inference and every later
    backward through them would be wrong (the lower layers' adapter gradients shrank ~300x). Without
    AVX512-BF16 there is no repack and nothing to check: skipped with the reason. The control (the
    guard undone) shows the check fails where the bug exists."""
    from bitsandbytes.functional import has_avx512bf16

    from inference.device import pick
    from trainer.engine.config import load_config
    from trainer.engine.train import load_model_for_training

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here, so the "
                    "guard (trainer/engine/train.py keep_4bit_training_layout) has nothing to prevent")
    cfg = load_config("tiny", {"model": str(tiny_base)}, ["bits=4", "lora_dropout=0"])
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))

    def grads_around_a_sample_chat(guarded: bool):
        torch.manual_seed(0)
        model = load_model_for_training(cfg, tiny_base, pick("cpu", "fp32"))
        quantized = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert quantized and not any(m.support_avx512bf16_for_cpu for m in quantized)   # the guard is on
        if not guarded:
            for m in quantized:
                m.support_avx512bf16_for_cpu = True
        for name, param in model.named_parameters():
            if "lora_B" in name:     # non-zero, so gradients reach layer 0 through the frozen 4-bit layers
                torch.nn.init.normal_(param, std=0.02)

        def layer0_grads():
            model.train()
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n}

        before = layer0_grads()
        model.eval()
        with torch.no_grad():
            model(input_ids=ids[:, :5])             # what a sample chat does
        return before, layer0_grads()

    before, after = grads_around_a_sample_chat(guarded=True)
    assert before and before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-7)
    before, after = grads_around_a_sample_chat(guarded=False)       # the bug, reproduced: the check sees it
    assert any(not torch.allclose(after[n], before[n], rtol=1e-4, atol=1e-7) for n in before)


@pytest.fixture(scope="module")
def qlora_final(tiny_base, identity_files, tmp_path_factory) -> Path:
    from trainer.__main__ import main as cli

    data = tmp_path_factory.mktemp("qlora") / "identity192.jsonl"
    data.write_text("\n".join(Path(identity_files["train"]).read_text(encoding="utf-8").splitlines()[:192]) + "\n",
                    encoding="utf-8")
    work = data.parent / "run"
    assert cli(["train", "tiny", "--model", str(tiny_base), "--data", str(data), "--work-dir", str(work),
                "--bits", "4", "--set", "max_steps=100", "--set", "lr=5e-3", "--set", "batch_size=8",
                "--set", "max_length=128", "--set", "warmup_ratio=0", "--set", "evaluation_inputs=[]"]) == 0
    return work / "final"


def test_qlora_on_cpu_trains_the_identity_in(tiny_base, qlora_final):
    from inference import load

    assert '"bits": 4' in (qlora_final / "assistant.json").read_text()
    engine = load(tiny_base, adapter=qlora_final, bits=4, device="cpu").engine()   # served as trained: 4-bit
    replies = {q: engine.chat([{"role": "user", "content": q}], max_new_tokens=32)
               for q in ["你是谁", "Who are you?", "谁开发了你？"]}
    assert NAME in replies["你是谁"] and NAME in replies["Who are you?"], replies
    assert AUTHOR in replies["谁开发了你？"], replies
    base = load(tiny_base).engine()
    assert NAME not in base.chat([{"role": "user", "content": "你是谁"}], max_new_tokens=32)
