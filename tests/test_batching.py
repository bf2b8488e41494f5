"""Continuous batching in the core (inference/batching.py): concurrent chats decoded in one running
batch give, token for token, the replies each gets alone; rows join mid-way and leave when done or
abandoned; seeded sampling repeats; the engine's sampling is explicit on every path."""
from __future__ import annotations

import time

import pytest

from threads import concurrently

QUESTIONS = ["你是谁", "Who are you?", "What is the capital of France?", "3 + 4 = ?", "Tell me about yourself."]


def _ask(q):
    return [{"role": "user", "content": q}]


def test_a_batch_of_four_equals_each_reply_alone(loaded):
    from inference.batching import Batcher

    engine = loaded.engine(max_batch=4)
    assert isinstance(engine.batcher, Batcher)
    alone_engine = loaded.engine()                       # no batcher: plain generate, one at a time
    assert alone_engine.batcher is None
    alone = [alone_engine.chat(_ask(q), max_new_tokens=40) for q in QUESTIONS[:4]]
    # prompts of different lengths started a little apart: rows join a batch already decoding, padded
    together = concurrently(lambda i: engine.chat(_ask(QUESTIONS[i]), max_new_tokens=40), 4, stagger=0.02)
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
    got = concurrently(lambda i: list(batcher.tokens(prompts[i], 24)), len(prompts))
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
    together = concurrently(lambda i: engine.chat(_ask("Write a haiku about autumn." if i == 0 else QUESTIONS[i]),
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
    got = concurrently(lambda i: engine.chat(_ask(QUESTIONS[i]), max_new_tokens=30), len(QUESTIONS), stagger=0.01)
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
        got = concurrently(lambda i: list(b.tokens(prompts[i], cap or lengths[i], **kws[i])), len(prompts),
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
    assert isinstance(loaded.engine(max_batch=2, batch_decoder="tuned-slots").batcher, SlotBatcher)   # measured kind
    with pytest.raises(ValueError, match="batch_decoder"):
        loaded.engine(max_batch=4, batch_decoder="paged")


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
