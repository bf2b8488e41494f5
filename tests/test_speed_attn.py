"""The training engine's attention and precision switches (trainer/engine/speed.py, trainer/engine/train.py):
`attn_implementation` (flex_attention over packed rows, sdpa for generation) and `fp32_upcast`."""
from __future__ import annotations

import pytest
import torch

from trainer.engine.config import load_config
from inference.errors import UserError


def test_attn_implementation_is_checked():
    assert load_config("tiny", {}, ["attn_implementation=flex_attention"]).attn_implementation == "flex_attention"
    with pytest.raises(UserError, match="attn_implementation must be sdpa, flex_attention or eager"):
        load_config("tiny", {}, ["attn_implementation=flash"])


def test_flex_model_matches_sdpa_on_packed_rows_and_generates_with_sdpa(tiny_base):
    """FlexAttention's block mask keeps each packed conversation to itself exactly as sdpa's dense
    mask does (forward only: torch has no FlexAttention backward on CPU), and `generate` on the
    flex model runs through sdpa and switches back afterwards."""
    from transformers import AutoModelForCausalLM

    from trainer.engine.speed import generate_with_sdpa

    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 96))
    pos = torch.cat([torch.arange(40), torch.arange(56)]).repeat(2, 1)   # two conversations per row
    models = {impl: AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=impl, dtype=torch.float32)
              for impl in ("sdpa", "flex_attention")}
    with torch.no_grad():
        losses = {impl: m(input_ids=ids, position_ids=pos, labels=ids).loss.item() for impl, m in models.items()}
        unpacked = models["sdpa"](input_ids=ids, labels=ids).loss.item()
    assert losses["flex_attention"] == pytest.approx(losses["sdpa"], abs=1e-4)
    assert abs(unpacked - losses["sdpa"]) > 1e-3          # the packing mask matters: the check can fail

    flex = models["flex_attention"]
    assert generate_with_sdpa(flex)
    seen = []
    forward = flex.model.forward

    def spy(*a, **k):
        seen.append(flex.config._attn_implementation)
        return forward(*a, **k)

    flex.model.forward = spy
    prompt = ids[:1, :12]
    out = flex.generate(prompt, max_new_tokens=6, do_sample=False)
    ref = models["sdpa"].generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.tolist() == ref.tolist()
    assert seen and set(seen) == {"sdpa"}
    assert flex.config._attn_implementation == "flex_attention"


def test_flex_gradients_match_sdpa_on_packed_rows(tiny_base):
    """A training step through FlexAttention (what `attn_implementation: flex_attention` trains with on
    CUDA) gives sdpa's gradients on packed rows, every parameter. Needs FlexAttention's backward: torch
    has none on the CPU, so here it skips with torch's own reason; on a GPU it runs."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 96), device=device)
    pos = torch.cat([torch.arange(40), torch.arange(56)]).repeat(2, 1).to(device)
    grads = {}
    for impl in ("sdpa", "flex_attention"):
        model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=impl, dtype=torch.float32,
                                                     device_map={"": device})
        model.train()
        try:
            model(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
        except NotImplementedError as exc:
            pytest.skip(f"no FlexAttention backward on {device}: {exc}")
        grads[impl] = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["flex_attention"].keys() and grads["sdpa"]
    for name, want in grads["sdpa"].items():
        torch.testing.assert_close(grads["flex_attention"][name], want, rtol=1e-3, atol=1e-5)


def test_flex_falls_back_to_sdpa_for_cpu_training(tiny_base, caplog):
    from inference.device import pick
    from trainer.engine.train import load_model_for_training

    cfg = load_config("tiny", {"model": str(tiny_base)}, ["attn_implementation=flex_attention"])
    model = load_model_for_training(cfg, tiny_base, pick("cpu", "fp32"))
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert "trains on CUDA only" in caplog.text


def test_fp32_upcast_off_keeps_the_frozen_weights_in_the_compute_dtype(tiny_base):
    """QLoRA loads through PEFT's prepare_model_for_kbit_training, which copies embeddings, norms and
    lm_head to fp32; `fp32_upcast: false` keeps them bf16. Adapter weights stay fp32 either way, and
    the loss of the bf16 model stays close to the upcast one's."""
    from inference.device import pick
    from trainer.engine.train import load_model_for_training

    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 64))
    losses = {}
    for upcast in (True, False):
        cfg = load_config("tiny", {"model": str(tiny_base)}, ["bits=4", f"fp32_upcast={str(upcast).lower()}"])
        model = load_model_for_training(cfg, tiny_base, pick("cpu", "bf16"))
        frozen = {p.dtype for n, p in model.named_parameters()
                  if "lora_" not in n and p.__class__.__name__ != "Params4bit"}
        adapter = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        assert frozen == ({torch.float32} if upcast else {torch.bfloat16})
        assert adapter == {torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        losses[upcast] = out.loss.item()
    assert losses[False] == pytest.approx(losses[True], rel=0.02)
