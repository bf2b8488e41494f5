"""Continuous batching in the core (inference/batching.py): concurrent chats decoded in one running
batch give, token for token, the replies each gets alone; rows join mid-way and leave when done or
abandoned; seeded sampling repeats; the engine's sampling is explicit on every path."""
from __future__ import annotations

import threading
import time

import pytest

QUESTIONS = ["你是谁", "Who are you?", "What is the capital of France?", "3 + 4 = ?", "Tell me about yourself."]


@pytest.fixture(scope="module")
def loaded(merged_model):
    from inference import load

    return load(merged_model, device="cpu")


def _ask(q):
    return [{"role": "user", "content": q}]


def _concurrently(fn, n: int, stagger: float = 0.0) -> list:
    out = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(timeout=120)
    return out


def test_a_batch_of_four_equals_each_reply_alone(loaded):
    from inference.batching import Batcher

    engine = loaded.engine(max_batch=4)
    assert isinstance(engine.batcher, Batcher)
    alone_engine = loaded.engine()                       # no batcher: plain generate, one at a time
    assert alone_engine.batcher is None
    alone = [alone_engine.chat(_ask(q), max_new_tokens=40) for q in QUESTIONS[:4]]
    # prompts of different lengths started a little apart: rows join a batch already decoding, padded
    together = _concurrently(lambda i: engine.chat(_ask(QUESTIONS[i]), max_new_tokens=40), 4, stagger=0.02)
    assert together == alone
    assert engine.batcher.peak >= 2, "the requests never shared a decode step"


@pytest.mark.parametrize("kind", ["dynamic", "slots"])
def test_batched_token_ids_equal_generate(loaded, kind):
    """The batcher's own token stream (ids, not text) against transformers' generate, greedy. "slots" is
    the CUDA decoder (fixed cache slots, inference/slot_decode.py) run eagerly: the same math, no graph."""
    import torch

    from inference.batching import Batcher
    from inference.slot_batcher import SlotBatcher
    from inference.chat_format import prompt_ids, with_system

    model, tok = loaded.model, loaded.tokenizer
    engine = loaded.engine()
    batcher = Batcher(model, engine.stop, max_batch=8) if kind == "dynamic" else \
        SlotBatcher(model, engine.stop, max_batch=8, max_len=256, compile=False, use_graph=False)
    prompts = [prompt_ids(tok, with_system(_ask(q), loaded.system_prompt)) for q in QUESTIONS]
    got = _concurrently(lambda i: list(batcher.tokens(prompts[i], 24)), len(prompts))
    for p, g in zip(prompts, got):
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             eos_token_id=engine.stop, pad_token_id=engine.stop[0])[0, len(p):].tolist()
        assert g == [t for t in out if t not in engine.stop][:24]
    if kind == "slots":
        assert batcher.pipelined_steps > 0, "the slot batcher never ran a pipelined step"


def test_an_abandoned_stream_leaves_the_batch_and_the_others_finish(loaded):
    engine = loaded.engine(max_batch=4)
    want = engine.chat(_ask("Who are you?"), max_new_tokens=24)
    engine.batcher.stop = set()                       # the first reply would never end on its own
    long = engine.stream_chat(_ask("Tell me a long story."), max_new_tokens=2000)
    for _, _text in zip(range(3), long):
        pass
    assert engine.batcher.running == 1
    engine.batcher.stop = set(engine.stop)
    other = engine.stream_chat(_ask("Who are you?"), max_new_tokens=24)
    first = next(other)                               # it joined the running batch at once
    long.close()                                      # the consumer goes away
    deadline = time.monotonic() + 1.0
    while engine.batcher.running > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    rest = list(other)
    assert (rest[-1] if rest else first) == want
    deadline = time.monotonic() + 1.0
    while engine.batcher.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.batcher.running == 0


def test_seeded_sampling_repeats_in_a_batch_and_alone(loaded):
    engine = loaded.engine(max_batch=4)
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = engine.chat(_ask("Write a haiku about autumn."), **kw)
    together = _concurrently(lambda i: engine.chat(_ask("Write a haiku about autumn." if i == 0 else QUESTIONS[i]),
                                                   **kw), 3)
    assert together[0] == alone
    unseeded = {engine.chat(_ask("Write a haiku about autumn."), max_new_tokens=24, temperature=1.5, top_p=1.0)
                for _ in range(4)}
    assert len(unseeded) > 1, "sampling without a seed drew the same reply four times"


def test_top_k_is_explicit_on_every_path(loaded):
    """transformers' generate falls back to top-k 50 when none is given; the engine always passes one:
    the model's own (here none -> 0, off), or the caller's."""
    engine = loaded.engine()
    assert engine.top_k == int(loaded.model.generation_config.top_k or 0)
    kw = engine._gen_kwargs(16, 0.7, 0.9, 1.0, engine.top_k)
    assert kw["top_k"] == engine.top_k and kw["do_sample"]
    loaded.model.generation_config.top_k = 20            # a model that ships one (Qwen2 does)
    try:
        assert loaded.engine().top_k == 20
    finally:
        loaded.model.generation_config.top_k = None


def test_the_serving_benchmark_runs_end_to_end(tmp_path, merged_model):
    """bench/serve_load.py --smoke: real server, real clients, every engine; every reply runs to max_tokens
    (usage counts the reply's text re-encoded, so a special token decoded away can make it one short)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "serve.json"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "bench" / "serve_load.py"), "--smoke", "--model", str(merged_model),
                    "--engine", "batched", "serial", "generate", "--out", str(out)], check=True, cwd=repo, timeout=600)
    runs = json.loads(out.read_text())["runs"]
    assert {(r["engine"], r["streams"]) for r in runs} == {(e, n) for e in ("batched", "serial", "generate") for n in (1, 2)}
    for r in runs:
        assert all(7 * r["streams"] <= rep["tokens"] <= 8 * r["streams"] for rep in r["repeats"]), r
        assert r["aggregate_tok_s"] > 0


def test_the_decode_benchmark_runs_every_path(tmp_path, merged_model):
    """bench/batch_decode.py --smoke: generate, the streaming path, both batchers and the apps' serving engine at
    1 and 2 streams; the batchers' consumers check every reply ran to max_tokens (the script asserts it)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "decode.json"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "bench" / "batch_decode.py"), "--smoke", "--model", str(merged_model),
                    "--out", str(out)], check=True, cwd=repo, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["streams"]) for r in rows} == {(i, n) for i in ("generate", "stream", "slots", "dynamic",
                                                                                     "serve") for n in (1, 2)}
    assert all(r["tok_s_median"] > 0 for r in rows)


def test_slots_are_reused_as_requests_come_and_go(loaded):
    """Slot decoding with fewer slots than requests: later requests wait for a free slot, take the slot
    an earlier one left (stale keys/values beyond their prompt are masked), and still decode exactly
    what they decode alone; every slot is free again at the end."""
    from inference.slot_batcher import SlotBatcher

    alone = loaded.engine()
    want = [alone.chat(_ask(q), max_new_tokens=30) for q in QUESTIONS]
    engine = loaded.engine()
    engine.batcher = SlotBatcher(loaded.model, engine.stop, max_batch=2, lock=engine._lock, max_len=256,
                                 compile=False, use_graph=False)
    got = _concurrently(lambda i: engine.chat(_ask(QUESTIONS[i]), max_new_tokens=30), len(QUESTIONS), stagger=0.01)
    assert got == want
    assert engine.batcher.peak == 2
    deadline = time.monotonic() + 10           # the worker frees a slot just after handing over the last token
    while engine.batcher.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(engine.batcher._free) == [0, 1] and engine.batcher.running == 0


def test_pipelined_slot_steps_equal_lockstep_ones(loaded):
    """The slot batcher's pipelined steps (tokens picked on the device and fed to the next step before the
    host reads them) against lockstep steps (the host picks every token): the same seeded samples
    (temperature, top-k, top-p), the same greedy tokens, with a repetition-penalty row that switches the
    batch to lockstep and back mid-way; and a reply that runs to the end of its cache slot (the pipeline
    decodes one step past a row's end) stays in range."""
    from inference.slot_batcher import SlotBatcher
    from inference.chat_format import prompt_ids, with_system

    tok = loaded.tokenizer
    prompts = [prompt_ids(tok, with_system(_ask(q), loaded.system_prompt)) for q in QUESTIONS]
    kws = [dict(temperature=0.9, top_k=20, top_p=0.9, seed=7), dict(), dict(temperature=1.2, seed=3),
           dict(repetition_penalty=1.3), dict()]

    lengths = [60, 60, 60, 10, 60]

    def run(pipeline: bool, slot_len: int = 256, cap: int | None = None):
        b = SlotBatcher(loaded.model, [], max_batch=4, max_len=slot_len, compile=False, use_graph=False,
                        pipeline=pipeline)
        # the short penalised row starts late: the batch runs pipelined, then in lockstep, then pipelined again
        got = _concurrently(lambda i: list(b.tokens(prompts[i], cap or lengths[i], **kws[i])), len(prompts),
                            stagger=0.05)
        deadline = time.monotonic() + 10
        while b.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(b._free) == [0, 1, 2, 3], "a slot was never freed"
        return got, b

    piped, b = run(True)
    locked, _ = run(False)
    assert piped == locked
    assert [len(g) for g in piped] == lengths
    assert b.pipelined_steps > 0 and b.lockstep_steps > 0, (b.pipelined_steps, b.lockstep_steps)
    longest = max(len(p) for p in prompts)
    full, b = run(True, slot_len=longest + 8, cap=100)      # capped at the slot's room
    assert [len(g) for g in full] == [longest + 8 - 1 - len(p) for p in prompts]


def test_a_batched_prefill_equals_each_prompt_alone(loaded):
    """A burst of requests is prefilled in one padded pass (inference/slot_decode.py `prefill_many`): each
    prompt's last logits and its slot's keys/values equal those of the prompt prefilled alone."""
    import torch

    from inference.chat_format import prompt_ids, with_system
    from inference.slot_decode import SlotDecoder

    prompts = [prompt_ids(loaded.tokenizer, with_system(_ask(q), loaded.system_prompt)) for q in QUESTIONS[:3]]
    assert len({len(p) for p in prompts}) == 3, "the prompts should differ in length (padding)"
    together = SlotDecoder(loaded.model, slots=4, length=128, compile=False, use_graph=False)
    alone = SlotDecoder(loaded.model, slots=4, length=128, compile=False, use_graph=False)
    got = together.prefill_many([3, 0, 2], prompts)
    for i, (slot, p) in enumerate(zip([3, 0, 2], prompts)):
        want = alone.prefill_many([slot], [p])[0]
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
        assert int(got[i].argmax()) == int(want.argmax())
        for (k1, v1), (k2, v2) in zip(together.cache, alone.cache):
            torch.testing.assert_close(k1[slot, :, :len(p)], k2[slot, :, :len(p)], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v1[slot, :, :len(p)], v2[slot, :, :len(p)], rtol=1e-4, atol=1e-4)


def test_the_engine_picks_slots_on_cuda_only(loaded):
    """auto: fixed slots where a graph pays (CUDA, Llama family, unquantized); the dynamic cache on CPU.
    Slots also bound the context: a prompt and its reply must fit one slot."""
    from inference.batching import Batcher
    from inference.slot_batcher import SlotBatcher

    assert type(loaded.engine(max_batch=4).batcher) is Batcher
    forced = loaded.engine(max_batch=4, batch_decoder="slots")
    assert isinstance(forced.batcher, SlotBatcher)
    assert forced.max_context == forced.batcher.decoder.length == min(loaded.model.config.max_position_embeddings, 4096)
    with pytest.raises(ValueError, match="batch_decoder"):
        loaded.engine(max_batch=4, batch_decoder="paged")


def test_int8_cpu_decode_gives_a_sane_reply(loaded):
    """cpu_decode="int8" (inference/cpu_decode.py): the engine decodes an int8-weight copy -- the model it
    was given keeps its fp32 layers -- and replies with text on every path (generate, batcher)."""
    import torch

    from inference.cpu_decode import Int8Linear

    engine = loaded.engine(cpu_decode="int8")
    assert engine.model is not loaded.model and isinstance(engine.model.lm_head, Int8Linear)
    assert type(loaded.model.lm_head) is torch.nn.Linear
    assert engine.model.model.embed_tokens.weight is loaded.model.model.embed_tokens.weight    # shared, not copied
    reply = engine.chat(_ask("Who are you?"), max_new_tokens=24)
    assert reply.strip() and "\ufffd" not in reply
    batched = loaded.engine(cpu_decode="int8", max_batch=2)
    assert batched.chat(_ask("Who are you?"), max_new_tokens=24).strip()


def test_int4_cpu_decode_gives_a_sane_reply(loaded):
    """cpu_decode="int4": the same, with 4-bit weights in groups of 32 (torch's CPU int4 kernel) in every
    decoder layer and the output layer's best logits recomputed from its own fp32 weights (`ShortlistHead`)."""
    import torch

    from inference.cpu_decode import Int4Linear, ShortlistHead

    engine = loaded.engine(cpu_decode="int4")
    layers = engine.model.model.layers
    assert all(isinstance(m, Int4Linear) for layer in layers for m in (layer.self_attn.q_proj, layer.mlp.down_proj))
    assert isinstance(engine.model.lm_head, ShortlistHead) and type(loaded.model.lm_head) is torch.nn.Linear
    assert engine.model.lm_head.exact is loaded.model.lm_head.weight                 # shared, not copied
    reply = engine.chat(_ask("Who are you?"), max_new_tokens=24)
    assert reply.strip() and "\ufffd" not in reply
    assert loaded.engine(cpu_decode="int4", max_batch=2).chat(_ask("Who are you?"), max_new_tokens=24).strip()


def test_cpu_decode_threads_leave_one_core_to_the_consumer_and_keep_the_default(merged_model):
    """On the CPU the engine's worker and the batcher's loop decode with one OpenMP thread fewer than torch's
    default (the consumer streaming the text needs a core: inference/device.py); the process's default, the
    calling thread's and that of threads started later stay as they were. In a fresh process with 2 threads."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import json, threading, torch
from inference import load
from inference.device import use_decode_threads
loaded = load({str(merged_model)!r}, device="cpu")
engine, batched = loaded.engine(), loaded.engine(max_batch=2)
got = {{"main": torch.get_num_threads(), "worker": engine._worker.submit(torch.get_num_threads).result()}}
batched.chat([{{"role": "user", "content": "hi"}}], max_new_tokens=2)        # starts the batcher's loop
got["gpu"] = use_decode_threads(torch.device("meta"))                         # not the CPU: untouched
def later(): got["later"] = torch.get_num_threads()
t = threading.Thread(target=later); t.start(); t.join()
got["main_after"] = torch.get_num_threads()
got["batcher"] = batched.batcher.threads
print(json.dumps(got))
"""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, capture_output=True, text=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "2"}, timeout=300).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"main": 2, "worker": 1, "gpu": 2, "later": 2, "main_after": 2, "batcher": 1}, got


def test_int4_weights_are_within_half_a_grid_step_and_multiply_as_dequantized():
    """Int4Linear: each weight comes back within half its group's step (16 levels from the group's min to its
    max; plus bf16 rounding, the kernel's activation and output type), and x W^T is x times those weights."""
    import torch

    from inference.cpu_decode import GROUP, Int4Linear

    torch.manual_seed(0)
    out_f, in_f = 64, 4 * GROUP
    linear = torch.nn.Linear(in_f, out_f, bias=True)
    weight = linear.weight.data = torch.randn(out_f, in_f) * 0.05
    int4 = Int4Linear(linear)
    recovered = int4(torch.eye(in_f)).t() - linear.bias.data[:, None].bfloat16().float()   # column j = W[:, j]
    groups = weight.reshape(out_f, -1, GROUP)
    half_step = ((groups.amax(-1) - groups.amin(-1)) / 30).repeat_interleave(GROUP, dim=1)
    assert ((recovered - weight).abs() <= half_step + 2**-7 * (weight.abs() + linear.bias.data.abs()[:, None])).all()
    assert ((recovered - weight).abs() > 0.25 * half_step).any()       # 4 bits, not a copy of the fp32 weights
    x = torch.randn(3, in_f).bfloat16().float()
    assert torch.allclose(int4(x), x @ recovered.t() + linear.bias.data, rtol=2e-2, atol=2e-2)


def test_int4_keeps_a_fine_tune_merged_onto_a_base_on_the_4bit_grid():
    """A fine-tune merged onto a base whose weights sit on the 4-bit grid (the embedded base comes from a Q4_1
    GGUF) differs from it by a few hundredths of a step: rounded to 4 bits again it snaps back to the base, and
    the fine-tune is gone (the demo's model: identity 0.00 in plain int4). Int4Linear keeps the low-rank part of
    what rounding lost, so the fine-tune's effect on the outputs survives; the base itself keeps none."""
    import torch

    from inference.cpu_decode import GROUP, Int4Linear, int4_rounding

    torch.manual_seed(0)
    out_f, in_f = 256, 8 * GROUP
    base = int4_rounding(torch.randn(out_f, in_f) * 0.05)[2]
    delta = torch.randn(out_f, 8) @ torch.randn(8, in_f) * 3e-4       # rank 8, ~0.06 of a step
    layers = {}
    for name, weight in (("base", base), ("tuned", base + delta)):
        layers[name] = torch.nn.Linear(in_f, out_f, bias=False)
        layers[name].weight.data = weight
    base4, tuned4 = Int4Linear(layers["base"]), Int4Linear(layers["tuned"])
    assert base4.down is None and tuned4.down is not None
    x = torch.randn(64, in_f)
    effect = (x @ delta.t()).flatten()                                   # what the fine-tune changes
    seen = lambda a, b: float(torch.nn.functional.cosine_similarity((a - b).flatten(), effect, dim=0))
    with torch.no_grad():
        assert seen(tuned4._mm(x.bfloat16()).float(), base4._mm(x.bfloat16()).float()) < 0.3   # 4 bits alone: lost
        assert seen(tuned4(x), base4(x)) > 0.9


def test_the_int4_output_layer_gives_the_fp32_layers_best_logits_exactly():
    """ShortlistHead: the SHORTLIST tokens with the best 4-bit logits get the fp32 layer's logits, bit for bit
    as the fp32 matmul gives them, so the greedy pick is the fp32 layer's; the others keep their 4-bit logits,
    which differ (it is not an fp32 layer in disguise). A bias is added to both."""
    import torch

    from inference.cpu_decode import GROUP, SHORTLIST, Int4Linear, ShortlistHead

    torch.manual_seed(0)
    vocab, dim = 4 * SHORTLIST + 16, 4 * GROUP
    linear = torch.nn.Linear(dim, vocab, bias=True)
    head = ShortlistHead(linear)
    x = torch.randn(2, 3, dim)
    with torch.no_grad():
        exact, got, four = linear(x), head(x), Int4Linear(linear, residual=False)(x)
    assert got.shape == exact.shape == (2, 3, vocab)
    top = four.topk(SHORTLIST, dim=-1).indices
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    rest = torch.ones_like(got, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(got[rest], four[rest]) and not torch.allclose(got[rest], exact[rest], atol=1e-3)
    assert head.down is None                     # no SVD of the vocabulary-sized residual


def test_int4_leaves_layers_the_kernel_cannot_pack_and_an_odd_vocabulary_takes_int8():
    """torch's int4 kernel packs only input widths in multiples of 32 and output widths in multiples of 16: other
    layers keep their fp32 weights, and an output layer of that kind gets int8 instead of the shortlist."""
    import torch

    from inference.cpu_decode import GROUP, Int4Linear, Int8Linear, quantized_copy

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.packs, self.odd_out = torch.nn.Linear(4 * GROUP, 64), torch.nn.Linear(4 * GROUP, 40)
            self.lm_head = torch.nn.Linear(4 * GROUP, 263)

        def get_output_embeddings(self):
            return self.lm_head

    twin = quantized_copy(Tiny(), "int4")
    assert isinstance(twin.packs, Int4Linear) and type(twin.odd_out) is torch.nn.Linear
    assert isinstance(twin.lm_head, Int8Linear)


def test_the_compiled_cpu_slot_step_equals_the_eager_one(loaded):
    """The slot step compiled by inductor's C++ backend on CPU decodes the eager step's tokens (fp32, greedy)."""
    from inference.slot_batcher import SlotBatcher
    from inference.chat_format import prompt_ids, with_system

    engine = loaded.engine()
    prompts = [prompt_ids(loaded.tokenizer, with_system(_ask(q), loaded.system_prompt)) for q in QUESTIONS[:3]]
    eager = SlotBatcher(loaded.model, engine.stop, max_batch=2, max_len=256, compile=False)
    compiled = loaded.engine(max_batch=2, batch_decoder="compiled-slots").batcher
    for p in prompts:
        assert list(compiled.tokens(p, 20)) == list(eager.tokens(p, 20))
    assert compiled.decoder.fallback is None


def test_a_bad_cpu_decode_choice_is_one_clear_line(loaded, monkeypatch):
    from inference.errors import UserError

    with pytest.raises(ValueError, match=r"cpu_decode='int3': expected one of 'fp32', 'int8', 'int4'"):
        loaded.engine(cpu_decode="int3")
    monkeypatch.setenv("CPU_DECODE", "int3")
    with pytest.raises(UserError, match="CPU_DECODE='int3'"):
        loaded.engine()
    monkeypatch.setenv("CPU_DECODE", "int8")
    from inference.cpu_decode import Int8Linear

    assert isinstance(loaded.engine().model.lm_head, Int8Linear)


def test_cpu_decode_unset_is_int4_for_a_causal_lm_from_the_size_on(loaded, tiny_base, tuned_adapter, monkeypatch):
    """CPU_DECODE unset: a plain causal LM on the CPU decodes with int4 weights from AUTO_INT4_PARAMS on, fp32 below
    (the tiny base) and for an adapter left unmerged; CPU_DECODE=fp32 turns it off. The real base's side -- the
    app serving the merged 135M model in int4, naming itself -- is in tests/test_real_base.py."""
    from inference import load, loader
    from inference.cpu_decode import Int4Linear

    monkeypatch.delenv("CPU_DECODE", raising=False)
    size = sum(p.numel() for p in loaded.model.parameters())
    assert size < loader.AUTO_INT4_PARAMS and loaded.engine().model is loaded.model          # tiny: fp32 itself
    monkeypatch.setattr(loader, "AUTO_INT4_PARAMS", size)                                      # this size counts
    assert any(isinstance(m, Int4Linear) for m in loaded.engine().model.modules())
    adapted = load(tiny_base, adapter=tuned_adapter, device="cpu")
    assert loader.auto_cpu_decode(adapted.model) == "fp32"                                    # unmerged: fp32
    monkeypatch.setenv("CPU_DECODE", "fp32")
    assert loaded.engine().model is loaded.model


def test_int4_serving_reads_prompts_with_the_fp32_model_and_decodes_in_int4(loaded):
    """The batcher (the apps' path) prefills with the model as loaded -- torch's int4 kernel is slower than fp32's
    GEMM over many prompt rows -- and makes every decode step with the int4 copy; the first token is fp32's."""
    from inference.cpu_decode import Int4Linear

    engine = loaded.engine(cpu_decode="int4", max_batch=2)
    int4 = engine.batcher.model
    assert int4 is not loaded.model and any(isinstance(m, Int4Linear) for m in int4.modules())
    seen = {"fp32": [], "int4": []}
    hooks = [m.register_forward_hook(lambda mod, args, kw, out, k=k: seen[k].append(kw["input_ids"].shape[1]),
                                     with_kwargs=True) for k, m in (("fp32", loaded.model), ("int4", int4))]
    try:
        ids = list(engine.batcher.tokens(engine.prepare(_ask("Who are you?"), None, 6)[0].tolist(), 6))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen["fp32"]) == 1 and seen["fp32"][0] > 1                  # the prompt, once, in fp32
    assert seen["int4"] == [1] * (len(ids) - 1)                            # then one token a step, in int4
    fp32_first = loaded.engine(cpu_decode="fp32").greedy_ids(_ask("Who are you?"), 1)
    assert ids[0] == fp32_first[0]


def test_the_prefill_benchmark_runs_fp32_and_int4(tmp_path, merged_model):
    """bench/cpu_prefill.py --smoke: one timed forward pass per weight kind and prompt length, the copy's cost."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "prefill.json"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "bench" / "cpu_prefill.py"), "--smoke", "--model", str(merged_model),
                    "--weights", "fp32,int4", "--out", str(out)], check=True, cwd=repo, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["weights"], r["tokens"]) for r in rows] == [(w, n) for w in ("fp32", "int4") for n in (16, 32)]
    assert all(r["median_s"] > 0 for r in rows) and rows[-1]["copy_s"] > 0


def test_the_decode_benchmark_runs_int8_and_compiled_slots(tmp_path, merged_model):
    """bench/batch_decode.py --smoke with the CPU variants: int8 weights, the compiled slot step."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "decode.json"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "bench" / "batch_decode.py"), "--smoke", "--model", str(merged_model),
                    "--impl", "generate", "compiled-slots", "--cpu-weights", "fp32,int8", "--out", str(out)],
                   check=True, cwd=repo, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["weights"], r["streams"]) for r in rows} == {
        (i, w, n) for i in ("generate", "compiled-slots") for w in ("fp32", "int8") for n in (1, 2)}
    assert all(r["tok_s_median"] > 0 and r.get("compile_fallback") is None for r in rows)
