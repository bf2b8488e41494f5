"""The serving batcher's compiled CPU decode step (inference/row_step.py): token for token the model's own
forward while rows join and leave, compiled once at warm-up (no graph after it), a failed compile falls back
to the forward, and the engine picks it for an int4 copy on the CPU unless FAST_DECODE=off."""
from __future__ import annotations

import pytest

from compilers import needs_cpp_compiler
from threads import concurrently

QUESTIONS = ["你是谁", "Who are you?", "What is the capital of France?", "Tell me about yourself."]


def _prompts(loaded) -> list[list[int]]:
    from inference.chat_format import prompt_ids, with_system

    return [prompt_ids(loaded.tokenizer, with_system([{"role": "user", "content": q}], loaded.system_prompt))
            for q in QUESTIONS]


def _serve(batcher, prompts, caps) -> list[list[int]]:
    """Greedy ids of every prompt, started a little apart (rows join a running batch, left-padded) with
    different caps (rows leave at different steps: the batch and its cache shrink), then the first alone."""
    together = concurrently(lambda i: list(batcher.tokens(prompts[i], caps[i])), len(prompts), stagger=0.01)
    return together + [list(batcher.tokens(prompts[0], caps[0]))]


def test_the_compiled_row_step_decodes_the_forwards_tokens_with_no_graph_after_warm_up(loaded):
    """The int4 copy (the CPU serving default's kind) served by the compiled step and by the model's forward:
    the same token ids for each of four concurrent requests and one alone; warm-up compiled every graph the
    serving needed (one row, several rows), and the step really ran."""
    from torch._dynamo.utils import counters

    from inference.cpu_decode import Int4Linear

    needs_cpp_compiler()
    eager = loaded.engine(cpu_decode="int4", max_batch=4, batch_decoder="dynamic").batcher
    engine = loaded.engine(cpu_decode="int4", max_batch=4, batch_decoder="compiled")
    step = engine.batcher.row_step
    assert eager.row_step is None and step is not None
    assert isinstance(step.layers[0].self_attn.q_proj, Int4Linear)           # the int4 copy's own layers
    assert engine.batcher.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    prompts, caps = _prompts(loaded), [40, 24, 8, 32]
    got = _serve(engine.batcher, prompts, caps)
    assert got == _serve(eager, prompts, caps)
    # every token after a reply's first (the prompt's forward gives that one) came from a compiled step
    assert step.failed is None and step.steps >= max(map(len, got)) - 1 and engine.batcher.peak >= 2
    assert counters["stats"]["unique_graphs"] == graphs, "a shape or layout the warm-up did not compile"


def test_a_row_step_that_cannot_compile_falls_back_to_the_forward(loaded, caplog):
    """A compiler that fails (as with no C++ compiler on the machine): the first step says why once in the log,
    leaves the cache as it was, and the batcher decodes every token with the model's forward -- the same ids."""
    from inference.batching import Batcher
    from inference.cpu_decode import decode_model
    from inference.row_step import RowStep

    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model = decode_model(loaded.model, "int4")
    stop = loaded.engine().stop
    step = RowStep(model, 256, backend=broken)
    failing = Batcher(model, stop, max_batch=2, prefill_model=loaded.model, row_step=step)
    plain = Batcher(model, stop, max_batch=2, prefill_model=loaded.model)
    prompts = _prompts(loaded)[:2]
    with caplog.at_level("WARNING", logger="inference.row_step"):
        assert [list(failing.tokens(p, 10)) for p in prompts] == [list(plain.tokens(p, 10)) for p in prompts]
    assert step.steps == 0 and "no C++ compiler here" in (step.failed or "")
    assert sum("compiled decode step unavailable" in r.getMessage() for r in caplog.records) == 1


def test_the_engine_compiles_the_step_for_an_int4_copy_on_the_cpu_unless_fast_decode_is_off(loaded, monkeypatch):
    from inference.row_step import RowStep

    monkeypatch.delenv("FAST_DECODE", raising=False)
    assert loaded.engine(max_batch=4, cpu_decode="fp32").batcher.row_step is None          # fp32: Python's share small
    assert isinstance(loaded.engine(max_batch=4, cpu_decode="int4").batcher.row_step, RowStep)
    assert isinstance(loaded.engine(max_batch=4, cpu_decode="fp32", batch_decoder="compiled").batcher.row_step,
                      RowStep)
    monkeypatch.setenv("FAST_DECODE", "off")
    assert loaded.engine(max_batch=4, cpu_decode="int4").batcher.row_step is None
    with pytest.raises(ValueError, match="'compiled'"):
        loaded.engine(max_batch=4, batch_decoder="paged")
