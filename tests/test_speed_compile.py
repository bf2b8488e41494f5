"""`compile: true` (trainer/engine/speed.py `compile_layers`): each decoder layer compiled whole for training steps,
for real (Dynamo + AOTAutograd + inductor's C++ backend on this CPU), against eager: the same loss and gradients,
with and without gradient checkpointing (whose recompute must still run, through the compiled layer); no-grad
forwards stay eager; a compiler that fails leaves the run eager; the CPU compiles whole layers. Run: pytest tests/test_speed_compile.py"""
from __future__ import annotations

import pytest
import torch

from compilers import needs_cpp_compiler
from trainer.engine import speed


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("unit, per_layer", [("layer", 1), ("blocks", 4)])
def test_compiled_layers_train_like_eager_and_generation_stays_eager(tiny_lora, unit, per_layer):
    """The real torch.compile (Dynamo + AOTAutograd + inductor's C++ backend on this CPU; Triton on a
    GPU) on the tiny LoRA model, each layer whole (the CPU's unit) or its norms, attention and MLP apart (CUDA's):
    training steps run the compiled modules (Dynamo compiles frames) and give eager's loss and gradients; eval / no-grad forwards (generation) compile nothing and run eager."""
    from torch._dynamo.utils import counters

    build, batch, _ = tiny_lora
    needs_cpp_compiler()
    model = build()
    model.train()
    ref, ref_grads = loss_and_grads(model, batch)
    keys = set(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    assert speed.compile_layers(model, unit=unit) == per_layer * len(speed.decoder_layers(model))
    assert set(model.state_dict()) == keys                         # adapters and checkpoints save the same
    out, grads = loss_and_grads(model, batch)
    compiled = counters["frames"]["ok"]
    assert compiled > 0, "training steps must run the compiled forward"
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4) for n in grads)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert counters["frames"]["ok"] == compiled and counters["frames"]["total"] == counters["frames"]["ok"]
    torch._dynamo.reset()



def test_layers_that_cannot_compile_train_on_eager(tiny_lora, caplog):
    """A compiler that fails (a CPU machine without a C++ compiler): the first training forward says why, once,
    and every layer runs eager from then on -- eager's loss and gradients, no second attempt per layer."""
    build, batch, _ = tiny_lora

    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model = build()
    model.train()
    ref, ref_grads = loss_and_grads(model, batch)
    torch._dynamo.reset()
    assert speed.compile_layers(model, backend=broken) > 0
    with caplog.at_level("WARNING", logger="trainer"):
        for _ in range(2):
            out, grads = loss_and_grads(model, batch)
            assert torch.allclose(out.loss, ref.loss, atol=1e-6)
            assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-6) for n in ref_grads)
    said = [r.getMessage() for r in caplog.records if "training on without it" in r.getMessage()]
    assert len(said) == 1 and "no C++ compiler here" in said[0]
    torch._dynamo.reset()


def test_compiled_layers_under_checkpointing_recompute_in_backward_like_eager(tiny_lora):
    """With gradient checkpointing the compiled layer runs inside the checkpoint, twice a step (forward, then the
    recompute in backward), and the step gives eager checkpointing's loss and gradients."""
    build, batch, _ = tiny_lora
    needs_cpp_compiler()
    model = build()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ref, ref_grads = loss_and_grads(model, batch)
    torch._dynamo.reset()
    layers = speed.decoder_layers(model)
    assert speed.compile_layers(model) == len(layers)
    runs = []
    for layer in layers:
        compiled = layer._compiled_forward
        layer._compiled_forward = lambda *a, _f=compiled, **k: runs.append(1) or _f(*a, **k)
    out, grads = loss_and_grads(model, batch)
    assert len(runs) == 2 * len(layers), "the checkpoint must recompute each compiled layer in backward"
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)
    assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4) for n in ref_grads)
    torch._dynamo.reset()


def test_the_cpu_compiles_whole_layers_and_the_benchmarks_switch_picks_blocks(tiny_lora, monkeypatch):
    build, _, _ = tiny_lora
    monkeypatch.delenv(speed.COMPILE_UNIT_ENV, raising=False)
    model = build()
    layers = speed.decoder_layers(model)
    assert speed.compile_layers(model) == len(layers) and all(hasattr(layer, "_compiled_forward") for layer in layers)
    monkeypatch.setenv(speed.COMPILE_UNIT_ENV, "blocks")
    model = build()
    assert speed.compile_layers(model) == 4 * len(layers)
    assert not hasattr(speed.decoder_layers(model)[0], "_compiled_forward")
