"""CPU correctness of the speed features (trainer/speed.py, inference/fast_decode.py) and of the
multi-GPU launcher's logic (trainer/distributed.py). Speed itself is measured on a GPU by bench/,
never here. torch.compile is not compiled here (minutes on a 2-core CPU): its train/eval routing is
checked with a recording stand-in; compiled-vs-eager losses were compared on the H200 (BENCHMARKS.md).
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from trainer import distributed, speed


def test_chunked_cross_entropy_equals_plain_in_loss_and_grads():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    ref.backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = speed.ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 8)    # 5 chunks, last one short
    (got * 0.5).backward()                                                    # grad_out is applied
    assert torch.allclose(got, ref, rtol=1e-6)
    assert torch.allclose(hidden.grad, 0.5 * want_h, rtol=1e-6, atol=1e-9)
    assert torch.allclose(weight.grad, 0.5 * want_w, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def tiny_lora(tiny_base, identity_files):
    """The tiny base with a LoRA adapter (B made non-zero so the adapter matters) and two packed rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.dataset import Collator, encode_files, pack

    tok = AutoTokenizer.from_pretrained(tiny_base)
    samples, _ = encode_files([str(identity_files["train"])], tok, 128, None)
    batch = Collator(tok.pad_token_id, packed=True)(pack(samples[:12], 128)[:2])

    def build():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        return model
    return build, batch, tok


def _loss_and_grads(model, batch, **kw):
    model.zero_grad()
    out = model(**batch, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_loss_is_transformers_loss_on_a_lora_model(tiny_lora):
    build, batch, _ = tiny_lora
    plain = build()
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()   # assistant-only labels
    ref, ref_grads = _loss_and_grads(plain, batch)
    ref_n, _ = _loss_and_grads(plain, batch, num_items_in_batch=torch.tensor(500))

    fused = build()
    assert speed.enable_fused_loss(fused)
    out, grads = _loss_and_grads(fused, batch)
    assert out.logits is None                                   # the [tokens x vocab] logits never existed
    assert torch.allclose(out.loss, ref.loss, rtol=1e-5)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-7), name
    out_n, _ = _loss_and_grads(fused, batch, num_items_in_batch=torch.tensor(500))   # grad-accumulation scaling
    assert torch.allclose(out_n.loss, ref_n.loss, rtol=1e-5)
    with torch.no_grad():                                       # no labels (generation): the original forward
        logits = fused(input_ids=batch["input_ids"]).logits
        assert torch.equal(logits, plain(input_ids=batch["input_ids"]).logits)


def test_fused_loss_refuses_unknown_architectures(tiny_lora):
    build, _, _ = tiny_lora
    model = build()
    model.get_base_model().config.model_type = "gemma2"          # soft-capped logits: not the same function
    assert speed.enable_fused_loss(model) is False


def test_partial_checkpointing_and_compile_routing(tiny_lora, monkeypatch):
    build, batch, _ = tiny_lora
    model = build()
    model.get_base_model().gradient_checkpointing_enable()
    layers = speed.decoder_layers(model)
    assert speed.limit_checkpointing(model, 0.5) == len(layers) // 2
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) // 2) + [False] * (len(layers) - len(layers) // 2)

    calls = []

    def recording_compile(fn, **kw):     # stands in for torch.compile: records which path runs
        def run(*a, **k):
            calls.append(fn.__self__.__class__.__name__)
            return fn(*a, **k)
        return run
    monkeypatch.setattr(torch, "compile", recording_compile)
    keys = set(model.state_dict())
    model.train()
    ref, _ = _loss_and_grads(model, batch)
    assert speed.compile_layers(model) == 4 * len(layers)
    assert set(model.state_dict()) == keys                         # adapters and checkpoints save the same
    out, _ = _loss_and_grads(model, batch)
    assert torch.allclose(out.loss, ref.loss)
    assert calls, "training steps must use the compiled forward"
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert calls == []                                              # generation keeps the eager forward


def test_train_with_speed_fields_reaches_the_same_loss(tiny_base, identity_files, tmp_path):
    import json

    from trainer.config import load_config
    from trainer.train import train

    losses = {}
    for name, sets in (("plain", []), ("fast", ["fused_loss=true", "gradient_checkpointing=true",
                                                "checkpoint_fraction=0.5"])):
        cfg = load_config("tiny", {"model": str(tiny_base), "data": [str(identity_files["train"])],
                                   "work_dir": str(tmp_path / name)},
                          ["max_steps=3", "logging_steps=1", "evaluation_inputs=[]", *sets])
        train(cfg, echo=lambda s: None)
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "scalars.jsonl").read_text().splitlines()]
    assert len(losses["plain"]) == 3
    assert losses["fast"] == pytest.approx(losses["plain"], rel=1e-4)


def test_fast_decode_gives_generate_greedy_tokens_and_text(tiny_base):
    from inference.fast_decode import StaticDecoder, sample_next, stream_text
    from inference.loader import load

    loaded = load(tiny_base, device="cpu")
    engine = loaded.engine(fast_decode=True)
    assert engine.fast is None                                      # CPU: the shipped generate path, unchanged
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    want = engine.greedy_ids(messages, max_new_tokens=24)
    decoder = StaticDecoder(loaded.model, max_len=256)
    ids = engine.prepare(messages, None, 24)
    got = list(decoder.tokens(ids, 24, engine.stop))
    assert got == [t for t in want if t not in engine.stop][:len(got)] and got
    assert decoder.stats["new_tokens"] == len(got) and decoder.stats["graph"] is False
    text = list(stream_text(loaded.tokenizer, iter(got)))
    assert text[-1] == engine.chat(messages, max_new_tokens=24)
    logits = torch.tensor([0.1, 3.0, 0.2])
    assert sample_next(logits, 0.0, 0.9) == 1 and sample_next(logits, 1.0, 1e-6) == 1


def test_gpus_flag_strips_and_builds_the_launch():
    argv = ["tiny", "--gpus", "2", "--fsdp", "--deepspeed=zero2", "--set", "lr=1e-4", "--gpus=4"]
    assert distributed.strip_launch_flags(argv) == ["tiny", "--set", "lr=1e-4"]
    cmd = distributed.launch_command(["tiny"], 2, fsdp=True, grad_accum=2, port=1234)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--use_fsdp" in cmd and "--multi_gpu" not in cmd
    assert cmd[-5:] == ["trainer", "train", "tiny", "--set", "grad_accum=2"]
    ddp = distributed.launch_command(["tiny"], 2)
    assert "--multi_gpu" in ddp and "--num_processes" in ddp and ddp[ddp.index("--num_processes") + 1] == "2"
    zero3 = distributed.launch_command(["tiny"], 2, deepspeed="zero3_offload")
    assert "--use_deepspeed" in zero3 and zero3[zero3.index("--zero_stage") + 1] == "3"


def test_gpus_flag_checks_and_keeps_the_global_batch(monkeypatch):
    from trainer.config import TrainConfig
    from trainer.errors import UserError

    qlora, full = TrainConfig(bits=4, batch_size=4, grad_accum=4), TrainConfig(method="full", grad_accum=3)
    assert distributed.global_batch_accum(qlora, 2)[0] == 2
    assert distributed.global_batch_accum(full, 2)[0] == 3           # does not divide: kept, and said so
    with pytest.raises(UserError, match="only 0 CUDA GPU"):
        distributed.check_launch(full, 2, False, None, visible=0)
    with pytest.raises(UserError, match="--fsdp with bits 4"):
        distributed.check_launch(qlora, 2, True, None, visible=2)
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="deepspeed is not installed"):
        distributed.check_launch(full, 2, False, "zero2", visible=2)

    ran = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = types.SimpleNamespace(gpus=2, fsdp=False, deepspeed=None)
    rc = distributed.maybe_launch(qlora, args, ["p", "--gpus", "2"], echo=lambda s: None,
                                  run=lambda cmd: ran.append(cmd) or 0)
    assert rc == 0 and ran[0][-4:] == ["train", "p", "--set", "grad_accum=2"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.maybe_launch(qlora, args, ["p"], run=lambda cmd: 1 / 0) is None   # a worker trains


def test_train_cli_gpus_without_gpus_is_a_one_line_error(tiny_base, identity_files, capsys):
    from trainer.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(["train", "tiny", "--model", str(tiny_base), "--data", str(identity_files["train"]), "--gpus", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --gpus 2: only 0 CUDA GPU(s) visible")
