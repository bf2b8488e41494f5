"""Batch-1 streaming decode through the inference core: `generate` (dynamic cache) vs fast_decode.

    python bench/decode_speed.py --model /tmp/bench/model-internlm2-1.8b --impl generate --out gen.json
    python bench/decode_speed.py --model /tmp/bench/model-internlm2-1.8b --impl fast --out fast.json
    python bench/decode_speed.py --smoke                      # tiny random model on CPU (no graph)

One implementation per process, so "first call" is what a freshly started app pays: model load,
then the first reply (for `fast`, the CUDA-graph capture is inside it). Then `--repeats` timed
replies of `--new-tokens` tokens each: time to first token, tokens/s over the whole reply, and the
decode-only rate. `fast` runs through `ChatEngine(fast_decode=True).stream_chat`, the path the apps
use; `generate` through `ChatEngine.stream_chat` as shipped (TextIteratorStreamer + generate).
Both are greedy on the same prompt; the greedy token ids of both are written for comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = [{"role": "user", "content": "请你介绍一下你自己"}]


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(engine, new_tokens: int) -> dict:
    """The shipped stream_chat path, counted in tokens (random weights make text of unknown ids)."""
    import torch

    input_ids = engine.prepare(PROMPT, None, new_tokens)
    kw = engine._gen_kwargs(new_tokens, 0.0, None, 1.0)
    kw.update(min_new_tokens=new_tokens)             # random weights: never stop early
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        engine.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1,
                              **{k: v for k, v in kw.items() if k not in ("max_new_tokens", "min_new_tokens")})
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in engine.stream_chat(PROMPT, max_new_tokens=new_tokens):
        pass
    sync()
    streamed = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)
    sync()
    elapsed = time.perf_counter() - t0
    n = out.shape[1] - input_ids.shape[1]
    return {"new_tokens": n, "ttft_s": ttft, "elapsed_s": elapsed, "tokens_per_s": n / elapsed,
            "decode_tokens_per_s": (n - 1) / max(elapsed - ttft, 1e-9), "stream_chat_s": streamed,
            "ids": out[0, input_ids.shape[1]:].tolist()[:64]}


def timed_fast(engine, new_tokens: int) -> dict:
    sync()
    t0 = time.perf_counter()
    for _ in engine.stream_chat(PROMPT, max_new_tokens=new_tokens):
        pass
    sync()
    wall = time.perf_counter() - t0
    s = dict(engine.fast.stats)
    ids = list(engine.fast.tokens(engine.prepare(PROMPT, None, 64), 64, []))
    return {"new_tokens": s["new_tokens"], "ttft_s": s["ttft_s"], "elapsed_s": wall,
            "tokens_per_s": s["new_tokens"] / wall,
            "decode_tokens_per_s": (s["new_tokens"] - 1) / max(s["elapsed_s"] - s["ttft_s"], 1e-9),
            "graph": s["graph"], "graph_error": s["graph_error"], "ids": ids}


def run(model_dir: Path, impl: str, new_tokens: int, repeats: int, force_fast: bool = False) -> dict:
    t_start = time.perf_counter()
    from inference.loader import load

    loaded = load(model_dir)
    sync()
    load_s = time.perf_counter() - t_start
    engine = loaded.engine(fast_decode=impl == "fast")
    if impl == "fast" and engine.fast is None and force_fast:      # the CPU smoke: same code, no graph
        from inference.fast_decode import StaticDecoder

        engine.fast = StaticDecoder(loaded.model, max_len=512)
    measure = timed_fast if impl == "fast" else timed_generate
    t0 = time.perf_counter()
    first = measure(engine, new_tokens)
    first_call_s = time.perf_counter() - t0
    runs = [measure(engine, new_tokens) for _ in range(repeats)]
    best = max(runs, key=lambda r: r["tokens_per_s"])
    import torch

    return {"impl": impl, "model": str(model_dir), "device": loaded.note, "load_s": round(load_s, 2),
            "first_call_s": round(first_call_s, 2), "first_call": {k: v for k, v in first.items() if k != "ids"},
            "runs": [{k: v for k, v in r.items() if k != "ids"} for r in runs],
            "tokens_per_s": best["tokens_per_s"], "decode_tokens_per_s": best["decode_tokens_per_s"],
            "ttft_s": best["ttft_s"], "ms_per_token": 1000 / best["decode_tokens_per_s"], "ids": best["ids"],
            "warmup_s": getattr(engine.fast, "warmup_s", None) if engine.fast else None,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


def smoke(tokenizer_dir: Path | None) -> int:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.tiny import default_base

    root = Path(tempfile.mkdtemp(prefix="decode-smoke-"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or default_base())
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512)).save_pretrained(root)
    tok.save_pretrained(root)
    gen = run(root, "generate", 24, 1)
    fast = run(root, "fast", 24, 1, force_fast=True)
    same = gen["ids"][:24] == fast["ids"][:24]
    print(json.dumps({"generate_tok_s": gen["tokens_per_s"], "fast_tok_s": fast["tokens_per_s"], "same_ids": same}))
    return 0 if same else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--impl", choices=["generate", "fast"], default="fast")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--smoke-tokenizer", type=Path, help="tokenizer dir for --smoke (default: the tiny base's)")
    a = p.parse_args(argv)
    if a.smoke:
        return smoke(a.smoke_tokenizer)
    if a.model is None:
        p.error("--model is required")
    result = run(a.model, a.impl, a.new_tokens, a.repeats)
    print(f"RESULT decode {a.impl}: first call {result['first_call_s']:.2f} s (load {result['load_s']:.1f} s), "
          f"{result['tokens_per_s']:.0f} tok/s per reply, {result['ms_per_token']:.2f} ms/token decode, "
          f"ttft {result['ttft_s'] * 1000:.0f} ms", flush=True)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
