"""CPU correctness of the speed features (trainer/engine/speed.py, inference/fast_decode.py) and the one-line
error of `--gpus N` without GPUs (the launcher itself: tests/test_distributed.py). Speed itself is measured on a GPU by bench/,
never here. The compiled training layers: tests/test_speed_compile.py.
The decode step (inference/decode_step.py) is small enough to compile for real (inductor C++, ~40 s).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from compilers import needs_cpp_compiler
from trainer.engine import speed


def test_chunked_cross_entropy_equals_plain_in_loss_and_grads():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    ref.backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got, kl = speed.ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 8)    # 5 chunks, last one short
    (got * 0.5).backward()                                                    # grad_out is applied
    assert torch.allclose(got, ref, rtol=1e-6) and float(kl) == 0.0
    assert torch.allclose(hidden.grad, 0.5 * want_h, rtol=1e-6, atol=1e-9)
    assert torch.allclose(weight.grad, 0.5 * want_w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunks", ["eager", "compiled"])
@pytest.mark.parametrize("num_items", [None, 29])
def test_the_fused_loss_with_the_kl_term_equals_the_two_losses_computed_apart(num_items, chunks):
    """retain_kl on the fused loss: the cross-entropy and the KL toward the base share the logits of the KL
    positions; loss, KL and the hidden states' gradient equal the shifted cross-entropy plus the KL of
    trainer/engine/retain.py computed on its own -- KL rows spread over several chunks, one chunk without any --
    with the eager loop and with the chunks' elementwise work compiled for real (`compile: true`)."""
    from trainer.engine.retain import kl_to_base

    math = None
    if chunks == "compiled":
        needs_cpp_compiler()
        math = speed.compiled_chunk_math()

    torch.manual_seed(0)
    hidden = torch.randn(2, 15, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 15))
    labels[0, :3] = labels[1, :5] = labels[1, 9] = -100
    where = torch.zeros(2, 15, dtype=torch.bool)
    where[0, 4:9] = where[1, 5:8] = True                   # position t predicts labels[t + 1]: all labelled
    base = torch.randn(int(where.sum()), 16, dtype=torch.float64)
    scale = 0.7 / int(where.sum())
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]       # transformers' ForCausalLMLoss, kept in float64
    ref_ce = F.cross_entropy((hidden @ weight.t()).reshape(-1, 50), shifted.reshape(-1), reduction="sum")
    ref_ce = ref_ce / (num_items or int((shifted != -100).sum()))
    ref_kl = kl_to_base(hidden[where], base, weight, chunk_rows=3)
    (ref_ce + scale * ref_kl).backward()
    want = hidden.grad.clone()
    hidden.grad = None
    kl = {"where": where, "base_hidden": base, "scale": scale}
    got = speed.fused_causal_lm_loss(hidden, weight, labels, num_items, chunk_rows=4, kl=kl, math=math)
    got.backward()
    assert chunks == "eager" or speed.compiled_chunk_math() is not None      # compiled, not fallen back to eager
    assert torch.allclose(got, ref_ce + scale * ref_kl, rtol=1e-9)
    assert torch.allclose(kl["sum"], ref_kl.detach(), rtol=1e-9)
    assert torch.allclose(hidden.grad, want, rtol=1e-8, atol=1e-12)
    hidden.grad = None                   # no KL: the plain loss, through the same chunks
    plain = speed.fused_causal_lm_loss(hidden, weight, labels, num_items, chunk_rows=4, math=math)
    plain.backward()
    assert torch.allclose(plain, ref_ce, rtol=1e-9) and hidden.grad is not None


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


def test_partial_checkpointing(tiny_lora):
    build, _, _ = tiny_lora
    model = build()
    model.get_base_model().gradient_checkpointing_enable()
    layers = speed.decoder_layers(model)
    assert speed.limit_checkpointing(model, 0.5) == len(layers) // 2
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) // 2) + [False] * (len(layers) - len(layers) // 2)


def test_train_with_speed_fields_reaches_the_same_loss(tiny_base, identity_files, tmp_path):
    import json

    from trainer.engine.config import load_config
    from trainer.engine.train import train

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


def _greedy_case(tiny_base, max_new=24):
    from inference.loader import load

    loaded = load(tiny_base, device="cpu")
    engine = loaded.engine(fast_decode=True)
    assert engine.fast is None                                      # CPU: the shipped generate path, unchanged
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    want = engine.greedy_ids(messages, max_new_tokens=max_new)
    return loaded, engine, messages, [t for t in want if t not in engine.stop], engine.prepare(messages, None, max_new)


def test_fast_decode_gives_generate_greedy_tokens_and_text(tiny_base):
    from inference.fast_decode import StaticDecoder, sample_next, stream_text

    loaded, engine, messages, want, ids = _greedy_case(tiny_base)
    decoder = StaticDecoder(loaded.model, max_len=256, buckets=(32, 64))
    assert decoder.lengths == [32, 64, 256] and decoder.bucket_length(33) == 64 and decoder.bucket_length(300) == 256
    got = list(decoder.tokens(ids, 24, engine.stop))
    assert got == want and got
    s = decoder.stats
    assert s["new_tokens"] == len(got) and s["graph"] is False and s["mode"] == "graph"
    assert s["cache_len"] == decoder.bucket_length(ids.shape[1] + 24) < 256       # sized to the chat
    text = list(stream_text(loaded.tokenizer, iter(got)))
    assert text[-1] == engine.chat(messages, max_new_tokens=24)
    # a longer reply takes the next bucket (its own cache); the first one still answers the same
    want60 = [t for t in engine.greedy_ids(messages, max_new_tokens=60) if t not in engine.stop]
    longer = list(decoder.tokens(engine.prepare(messages, None, 60), 60, engine.stop))
    assert longer == want60 and longer[:len(got)] == got
    assert decoder.stats["cache_len"] > s["cache_len"]
    assert sorted(decoder.buckets) == [s["cache_len"], decoder.stats["cache_len"]]
    assert list(decoder.tokens(ids, 24, engine.stop)) == got
    # sampling runs on the device after the step; near-zero temperature is greedy again
    torch.manual_seed(0)
    assert list(decoder.tokens(ids, 24, engine.stop, temperature=1e-4, top_p=0.9)) == got
    logits = torch.tensor([0.1, 3.0, 0.2])
    assert sample_next(logits, 0.0, 0.9) == 1 and sample_next(logits, 1.0, 1e-6) == 1


def test_fast_decode_samples_with_top_k_and_repetition_penalty_like_generate(tiny_base):
    """The fast path's sampling on the device (issue 19): a repetition penalty gives `generate`'s own greedy
    tokens under the same penalty; top-k 1 is greedy whatever the temperature; a top-k draw never leaves
    the k best logits."""
    from inference.fast_decode import StaticDecoder, sample_on_device

    loaded, engine, messages, want, ids = _greedy_case(tiny_base)
    decoder = StaticDecoder(loaded.model, max_len=256, buckets=(64,))
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                repetition_penalty=1.5, eos_token_id=engine.stop, pad_token_id=engine.stop[0])
    penalised = [t for t in out[0, ids.shape[1]:].tolist() if t not in engine.stop]
    got = list(decoder.tokens(ids, 40, engine.stop, repetition_penalty=1.5))
    assert got == penalised
    assert penalised != [t for t in engine.greedy_ids(messages, max_new_tokens=40) if t not in engine.stop][:len(got)], \
        "the penalty should change this reply, or the test proves nothing"
    assert list(decoder.tokens(ids, 24, engine.stop, temperature=5.0, top_k=1)) == want
    logits = torch.randn(1000)
    best = set(logits.topk(5).indices.tolist())
    torch.manual_seed(0)
    assert {int(sample_on_device(logits, 5.0, 1.0, top_k=5)) for _ in range(200)} <= best
    # the engine takes the fast path for these too (no fallback to generate's streamer)
    engine.fast = decoder
    reply = engine.chat(messages, max_new_tokens=40, repetition_penalty=1.5)
    assert reply == loaded.tokenizer.decode(penalised, skip_special_tokens=True)


@pytest.mark.parametrize("mode", ["compile", "tuned"])
def test_compiled_decode_step_gives_generate_greedy_tokens(tiny_base, tmp_path, monkeypatch, mode):
    """mode="compile" with inductor's C++ backend on CPU (what the GPU runs with Triton): the
    layer written out in inference/decode_step.py, compiled once for all layers, equals `generate`;
    "tuned" (the same with inductor's coordinate-descent tuning, which tunes Triton kernels) as well."""
    import torch._dynamo

    from inference.fast_decode import StaticDecoder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loaded, engine, _, want, ids = _greedy_case(tiny_base)
    decoder = StaticDecoder(loaded.model, max_len=256, mode=mode)
    got = list(decoder.tokens(ids, 24, engine.stop))
    assert got == want and len(got) >= 8
    assert decoder.stats["mode"] == mode and decoder.stats["fallback"] is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3      # head, one layer for all, tail
    assert any((tmp_path / "inductor").iterdir())                           # kept on disk for the next process


def test_compile_failure_falls_back_to_the_models_own_step(tiny_base):
    from inference import decode_step
    from inference.fast_decode import StaticDecoder

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")
    loaded, engine, _, want, ids = _greedy_case(tiny_base)
    decoder = StaticDecoder(loaded.model, max_len=256, mode="compile", backend=broken_backend)
    got = list(decoder.tokens(ids, 24, engine.stop))
    assert got == want and got
    assert decoder.stats["mode"] == "graph" and "no compiler here" in decoder.stats["fallback"]

    eager = StaticDecoder(loaded.model, max_len=256, mode="compile", backend="eager")   # same step, not fused
    assert list(eager.tokens(ids, 24, engine.stop)) == got and eager.stats["mode"] == "compile"
    config = loaded.model.config
    old = config.model_type
    try:
        config.model_type = "gpt2"
        assert "gpt2" in decode_step.unsupported(loaded.model, 256)
        assert StaticDecoder(loaded.model, max_len=256, mode="compile").mode == "graph"
    finally:
        config.model_type = old
    with pytest.raises(ValueError, match="fast_decode"):
        loaded.engine(fast_decode="fastest")


# the launcher's own tests (flags, commands, DeepSpeed config, 2 CPU processes): tests/test_distributed.py


def test_train_cli_gpus_without_gpus_is_a_one_line_error(tiny_base, identity_files, capsys):
    from trainer.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(["train", "tiny", "--model", str(tiny_base), "--data", str(identity_files["train"]), "--gpus", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --gpus 2: no CUDA GPU is visible")


def test_front_ends_pick_fast_decode_by_device(tiny_base, monkeypatch):
    """`Loaded.engine()` (CLI chat, app.py, web_demo.py) turns the compiled decode on for CUDA models
    with unquantized weights only, and FAST_DECODE overrides it; on CPU the engine keeps `generate`."""
    from types import SimpleNamespace

    from inference.loader import auto_fast_decode, load

    monkeypatch.delenv("FAST_DECODE", raising=False)
    gpu = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    assert auto_fast_decode(gpu) is True
    assert auto_fast_decode(SimpleNamespace(device=SimpleNamespace(type="cuda"), is_quantized=True)) is False
    assert auto_fast_decode(SimpleNamespace(device=SimpleNamespace(type="cpu"))) is False
    monkeypatch.setenv("FAST_DECODE", "graph")
    assert auto_fast_decode(gpu) == "graph"
    monkeypatch.setenv("FAST_DECODE", "off")
    assert auto_fast_decode(gpu) is False
    monkeypatch.delenv("FAST_DECODE")
    loaded = load(str(tiny_base), device="cpu")
    engine = loaded.engine()
    assert engine.fast is None and engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=4)
    import inference.loader as loader_module

    seen = []

    class Spy(loader_module.ChatEngine):          # what Loaded.engine() hands the engine
        def __init__(self, *args, fast_decode=False, **kwargs):
            seen.append(fast_decode)
            super().__init__(*args, fast_decode=fast_decode, **kwargs)

    monkeypatch.setattr(loader_module, "ChatEngine", Spy)
    monkeypatch.setenv("FAST_DECODE", "graph")
    loaded.engine()
    loaded.engine(fast_decode=False)
    assert seen == ["graph", False]


def _bf16_lora(tiny_base, skip: bool):
    """The tiny base in bf16 with fp32 LoRA adapters (B != 0: they change the output), the same seed each
    time; with SKIP, `skip_adapter_input_casts` applied (asserted to find layers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.engine.train import skip_adapter_input_casts

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                     init_lora_weights=False))
    assert next(p for n, p in m.named_parameters() if "lora_A" in n).dtype == torch.float32
    if skip:
        assert skip_adapter_input_casts(m) > 0
    return m


def _autocast_step(m, ids):
    """Loss and adapter gradients of one bf16-autocast training step."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}


def test_adapter_inputs_stay_bf16_under_autocast_with_the_same_loss_and_grads(tiny_base):
    """`skip_adapter_input_casts`: under autocast the LoRA matmul sees the bf16 input itself (no fp32 copy),
    and loss and adapter gradients equal PEFT's casting path; without autocast the cast happens as before."""
    ids = torch.randint(0, 200, (2, 24))
    out = {}
    for skip in (False, True):
        m = _bf16_lora(tiny_base, skip)
        seen = []
        for mod in m.modules():
            if hasattr(mod, "lora_A"):
                mod.lora_A["default"].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
        out[skip] = (*_autocast_step(m, ids), set(seen))
        if skip:
            seen.clear()
            m(input_ids=ids)                                 # no autocast: PEFT's cast to fp32, as before
            assert set(seen) == {torch.float32}
    assert out[False][2] == {torch.float32} and out[True][2] == {torch.bfloat16}
    assert torch.equal(out[True][0], out[False][0])
    assert out[True][1].keys() == out[False][1].keys()
    assert all(torch.equal(out[True][1][k], out[False][1][k]) for k in out[False][1])


def test_compiled_blocks_take_the_uncast_adapter_inputs_without_graph_breaks(tiny_base):
    """The GPU runs `compile: true` under autocast: the compiled blocks must trace the autocast check of
    `skip_adapter_input_casts` (no graph break) and give the loss and gradients of PEFT's casting path."""
    import torch._dynamo.utils as dynamo_utils

    from trainer.engine.speed import compile_layers

    ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for skip in (False, True):
        m = _bf16_lora(tiny_base, skip)
        assert compile_layers(m) > 0
        m.train()                                    # the compiled forward runs for training steps only
        dynamo_utils.counters.clear()
        out[skip] = _autocast_step(m, ids)
        assert dynamo_utils.counters["stats"]["calls_captured"] > 0          # dynamo traced these blocks
        assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-3)
    for k, g in out[False][1].items():
        assert torch.allclose(out[True][1][k].float(), g.float(), rtol=1e-2, atol=1e-4), k
