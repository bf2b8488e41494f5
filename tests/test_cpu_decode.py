"""CPU decoding with int8 / int4 weights (inference/cpu_decode.py): the engines' copies reply sanely, 4-bit weights
round as the kernel multiplies, a fine-tune merged onto a 4-bit base survives, the output layer's best logits are
fp32's, the decode threads leave a core to the consumer, and the CPU benchmarks run."""
from __future__ import annotations

import pytest


def _ask(q):
    return [{"role": "user", "content": q}]


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


def test_the_int4_output_layer_gives_the_fp32_layers_best_logits():
    """ShortlistHead: the SHORTLIST tokens with the best 4-bit logits get the fp32 layer's logits (to fp32 rounding:
    a row-by-row product, not the same GEMM), so the greedy pick is the fp32 layer's; the others keep their 4-bit
    logits, which differ (it is not an fp32 layer in disguise). A bias is added to both."""
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


@pytest.mark.parametrize("kind", ["auto", "dynamic"])
def test_int4_serving_reads_prompts_with_the_fp32_model_and_decodes_in_int4(loaded, kind):
    """The batcher (the apps' path) prefills with the model as loaded -- torch's int4 kernel is slower than fp32's
    GEMM over many prompt rows -- and makes every decode step with the int4 copy: through its compiled step
    ("auto" on the CPU: inference/row_step.py, over the copy's own layers) or its forward ("dynamic"); the first
    token is fp32's."""
    from inference.cpu_decode import Int4Linear

    engine = loaded.engine(cpu_decode="int4", max_batch=2, batch_decoder=kind)
    int4, step = engine.batcher.model, engine.batcher.row_step
    assert int4 is not loaded.model and any(isinstance(m, Int4Linear) for m in int4.modules())
    assert (step is None) == (kind == "dynamic")
    seen = {"fp32": [], "int4": []}
    hooks = [m.register_forward_hook(lambda mod, args, kw, out, k=k: seen[k].append(kw["input_ids"].shape[1]),
                                     with_kwargs=True) for k, m in (("fp32", loaded.model), ("int4", int4))]
    try:
        ids = list(engine.batcher.tokens(engine.prepare(_ask("Who are you?"), None, 6)[0].tolist(), 6))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen["fp32"]) == 1 and seen["fp32"][0] > 1                  # the prompt, once, in fp32
    if step is None:
        assert seen["int4"] == [1] * (len(ids) - 1)                        # then one token a step, in int4
    else:
        assert seen["int4"] == [] and step.steps == len(ids) - 1 and step.failed is None
        assert step.layers == list(int4.model.layers)                      # ... through the int4 copy's layers
    fp32_first = loaded.engine(cpu_decode="fp32").greedy_ids(_ask("Who are you?"), 1)
    assert ids[0] == fp32_first[0]


def test_int4_chat_reads_prompts_with_the_fp32_model_and_decodes_in_int4(loaded):
    """The one-user `generate` path (the chat CLI, `max_batch=1`) does the same: all but the prompt's last token
    go through the model as loaded, once; `generate` then feeds the int4 copy that last token and one token a
    step, and the reply is text. With fp32 decoding nothing is read twice."""
    from inference.cpu_decode import Int4Linear

    def forwards(engine):
        seen = {"loaded": [], "decode": []}
        models = [("loaded", loaded.model)] + [("decode", engine.model)] * (engine.model is not loaded.model)
        hooks = [m.register_forward_hook(lambda mod, args, kw, out, k=k: seen[k].append(kw["input_ids"].shape[1]),
                                         with_kwargs=True) for k, m in models]
        try:
            reply = engine.chat(_ask("Who are you?"), max_new_tokens=8)
        finally:
            for h in hooks:
                h.remove()
        return seen, reply, engine.prepare(_ask("Who are you?"), None, 8).shape[1]

    int4 = loaded.engine(cpu_decode="int4")
    assert int4.batcher is None and any(isinstance(m, Int4Linear) for m in int4.model.modules())
    seen, reply, prompt = forwards(int4)
    assert seen["loaded"] == [prompt - 1]                                # the prompt but its last token, in fp32
    assert seen["decode"] and set(seen["decode"]) == {1}                 # the rest one token at a time, in int4
    assert reply.strip() and "\ufffd" not in reply
    seen, _, prompt = forwards(loaded.engine(cpu_decode="fp32"))
    assert seen["loaded"][0] == prompt and set(seen["loaded"][1:]) <= {1}     # fp32: the whole prompt, once


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


def test_the_agreement_benchmark_compares_the_output_layers(tmp_path, merged_model):
    """bench/quant_agreement.py --output-layer: every output layer on the fp32 model's own hidden states; fp32 agrees
    with itself exactly, and the shortlist is scored."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "heads.json"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "bench" / "quant_agreement.py"), "--model", str(merged_model),
                    "--output-layer", "--prompts", "2", "--max-tokens", "4", "--out", str(out)],
                   check=True, cwd=repo, timeout=600)
    res = json.loads(out.read_text())
    assert res["states"] > 0 and res["fp32"]["same_best"] == 1.0 and res["fp32"]["softmax_l1"] == 0.0
    assert all(0 <= res[k]["same_best"] <= 1 and res[k]["ms"] > 0 for k in ("int8", "int4", "int4 shortlist"))
    assert 0 <= res["fp32_best_in_int4_shortlist"] <= 1
