"""Batch-1 streaming decode through the inference core: `generate` vs fast_decode "graph" / "compile".

    python bench/decode_speed.py --model /tmp/bench/model-internlm2-1.8b --impl generate --repeats 1 --out gen.json
    python bench/decode_speed.py --model /tmp/bench/model-internlm2-1.8b --impl graph --out graph.json
    python bench/decode_speed.py --model M --impl compile --cache-dir /tmp/ind-decode --out cold.json  # empty dir
    python bench/decode_speed.py --model M --impl compile --cache-dir /tmp/ind-decode --out warm.json  # again
    python bench/decode_speed.py --model M --impl compile --inductor coordinate_descent_tuning=1 --cache-dir EMPTY
    python bench/decode_speed.py --table gen.json graph.json cold.json warm.json    # markdown table
    python bench/decode_speed.py --model M --impl tuned --cache-dir EMPTY   # compile + coordinate-descent tuning
    python bench/decode_speed.py --smoke            # tiny random model on CPU: every impl, same greedy ids

One implementation per process, so "first call" is what a freshly started app pays after loading
the model: the first reply, which for graph/compile includes building the cache, compiling (compile)
and capturing the CUDA graph. `compile` records whether its inductor cache dir was empty at start
(cold) or not (warm: a second process on the same machine). Then `--repeats` timed replies of
`--new-tokens` tokens, each through `ChatEngine.stream_chat` (the path the apps use): tokens/s over
the whole reply, the decode-only ms/token, time to first token. All are greedy on the same prompt;
the first 64 greedy ids are written for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = [{"role": "user", "content": "请你介绍一下你自己"}]
IMPLS = ("generate", "graph", "compile", "tuned")
COMPILED = ("compile", "tuned")


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reply_s(engine, new_tokens: int) -> float:
    """Wall time of one streamed reply through the core."""
    sync()
    t0 = time.perf_counter()
    for _ in engine.stream_chat(PROMPT, max_new_tokens=new_tokens):
        pass
    sync()
    return time.perf_counter() - t0


def timed_generate(engine, new_tokens: int) -> dict:
    """The shipped stream_chat (TextIteratorStreamer + generate); its token count and ids from a plain
    greedy generate of the same prompt, and the time to first token from a 1-token generate."""
    import torch

    input_ids = engine.prepare(PROMPT, None, new_tokens)
    kw = engine._gen_kwargs(new_tokens, 0.0, None, 1.0)
    mask = torch.ones_like(input_ids)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        engine.model.generate(input_ids=input_ids, attention_mask=mask, **{**kw, "max_new_tokens": 1})
    sync()
    ttft = time.perf_counter() - t0
    wall = reply_s(engine, new_tokens)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(input_ids=input_ids, attention_mask=mask, **kw)
    sync()
    raw = time.perf_counter() - t0
    n = out.shape[1] - input_ids.shape[1]
    return {"new_tokens": n, "ttft_s": ttft, "elapsed_s": wall, "tokens_per_s": n / wall,
            "decode_tokens_per_s": (n - 1) / max(raw - ttft, 1e-9), "raw_generate_s": raw,
            "ids": out[0, input_ids.shape[1]:].tolist()[:64]}


def timed_fast(engine, new_tokens: int) -> dict:
    wall = reply_s(engine, new_tokens)
    s = dict(engine.fast.stats)
    ids = list(engine.fast.tokens(engine.prepare(PROMPT, None, 64), 64, []))
    return {"new_tokens": s["new_tokens"], "ttft_s": s["ttft_s"], "elapsed_s": wall,
            "tokens_per_s": s["new_tokens"] / wall,
            "decode_tokens_per_s": (s["new_tokens"] - 1) / max(s["elapsed_s"] - s["ttft_s"], 1e-9),
            **{k: s[k] for k in ("mode", "cache_len", "graph", "graph_error", "fallback")}, "ids": ids}


def profile(engine, new_tokens: int) -> dict:
    """Where a reply's device time goes: the top kernels of one reply, and kernels per token."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        reply_s(engine, new_tokens)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    print(events.table(sort_by="device_time_total", row_limit=15), flush=True)
    n = engine.fast.stats["new_tokens"] if engine.fast else new_tokens
    return {"tokens": n, "kernels_per_token": sum(e.count for e in kernels) / max(n, 1),
            "device_ms_per_token": sum(e.self_device_time_total for e in kernels) / 1000 / max(n, 1)}


def run(model_dir: Path, impl: str, new_tokens: int, repeats: int, backend: str = "inductor",
        force_fast: bool = False, profile_tokens: int = 0) -> dict:
    import torch

    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    cold = impl in COMPILED and not (cache and Path(cache).is_dir() and any(Path(cache).iterdir()))
    t_start = time.perf_counter()
    from inference.loader import load

    loaded = load(model_dir)
    sync()
    load_s = time.perf_counter() - t_start
    engine = loaded.engine(fast_decode=impl if impl != "generate" else False)
    if impl != "generate" and (engine.fast is None or backend != "inductor") and force_fast:   # CPU smoke
        from inference.fast_decode import StaticDecoder

        engine.fast = StaticDecoder(loaded.model, max_len=min(engine.max_context, 4096), mode=impl, backend=backend)
    if impl != "generate" and engine.fast is None:
        raise SystemExit(f"error: --impl {impl} needs a CUDA GPU (this is {loaded.note}); try --smoke")
    measure = timed_fast if engine.fast is not None else timed_generate
    first_call_s = reply_s(engine, new_tokens)
    runs = [measure(engine, new_tokens) for _ in range(repeats)]
    best = max(runs, key=lambda r: r["tokens_per_s"])
    prof = None
    if profile_tokens and torch.cuda.is_available():
        try:
            prof = profile(engine, profile_tokens)
        except Exception as exc:          # the profiler's API moves between releases: keep the timings
            prof = {"error": f"{type(exc).__name__}: {exc}"}
    label = impl + (f" [{backend}]" if impl in COMPILED and backend != "inductor" else "") \
        + (f" ({'cold' if cold else 'warm'} cache)" if impl in COMPILED else "")
    return {"impl": impl, "label": label, "model": str(model_dir), "device": loaded.note,
            "torch": torch.__version__, "load_s": round(load_s, 2), "first_call_s": round(first_call_s, 2),
            "warmup_s": round(engine.fast.warmup_s, 2) if engine.fast else None,
            "inductor_cache": cache if impl in COMPILED else None,
            "cache_was_empty": cold if impl in COMPILED else None,
            "runs": [{k: v for k, v in r.items() if k != "ids"} for r in runs],
            "new_tokens": best["new_tokens"], "tokens_per_s": best["tokens_per_s"],
            "decode_tokens_per_s": best["decode_tokens_per_s"], "ms_per_token": 1000 / best["decode_tokens_per_s"],
            "ttft_s": best["ttft_s"], "ids": best["ids"], "profile": prof,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


def table(results: list[dict]) -> str:
    rows = ["| | first call (after load) | load | tokens/s per reply | ms/token (decode) | time to first token "
            "| cache slots | new tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        extra = r["runs"][0] if r["runs"] else {}
        warm = f" (warm-up {r['warmup_s']:.2f} s)" if r.get("warmup_s") is not None else ""
        note = f" [fell back: {extra['fallback']}]" if extra.get("fallback") else ""
        note += " [no CUDA graph]" if extra.get("graph") is False and r.get("peak_gib") is not None else ""
        rows.append(f"| {r['label']}{note} | {r['first_call_s']:.2f} s{warm} | {r['load_s']:.1f} s "
                    f"| {r['tokens_per_s']:.0f} | {r['ms_per_token']:.2f} | {r['ttft_s'] * 1000:.0f} ms "
                    f"| {extra.get('cache_len', '-')} | {r['new_tokens']} |")
    return "\n".join(rows)


def smoke(tokenizer_dir: Path | None, backend: str) -> int:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.bases.tiny import default_base

    root = Path(tempfile.mkdtemp(prefix="decode-smoke-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or default_base())
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    results = [run(root / "model", impl, 24, 1, backend=backend, force_fast=True) for impl in IMPLS]
    print(table(results))
    same = all(r["ids"][:24] == results[0]["ids"][:24] for r in results)
    modes = [r["runs"][0].get("mode") for r in results[1:]]
    print(json.dumps({"same_ids": same, "modes": modes}))
    return 0 if same and modes == list(IMPLS[1:]) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--impl", choices=IMPLS, default="compile")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, help="inductor cache dir for --impl compile (empty: a cold start)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (int / bool as 0 or 1) before compiling: options to measure "
                        "before the engine takes them (e.g. coordinate_descent_tuning=1, gpt-fast's setting)")
    p.add_argument("--profile", type=int, default=0, metavar="TOKENS",
                   help="after timing, profile one reply of TOKENS tokens (CUDA): top kernels, kernels per token")
    p.add_argument("--out", type=Path, help="write the result as JSON")
    p.add_argument("--table", type=Path, nargs="+", metavar="JSON", help="print result JSONs as a markdown table")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--smoke-tokenizer", type=Path, help="tokenizer dir for --smoke (default: the tiny base's)")
    p.add_argument("--smoke-backend", default="inductor", help="torch.compile backend for --smoke (inductor, eager)")
    a = p.parse_args(argv)
    if a.table:
        print(table([json.loads(f.read_text()) for f in a.table]))
        return 0
    if any("=" not in kv for kv in a.inductor):
        p.error("--inductor takes KEY=VALUE, e.g. coordinate_descent_tuning=1")
    options = dict(kv.split("=", 1) for kv in a.inductor)
    if options:
        import torch._inductor.config as inductor

        for key, value in options.items():
            if not hasattr(inductor, key):
                p.error(f"--inductor {key}: torch._inductor.config has no such option")
            if not value.lstrip("-").isdigit():
                p.error(f"--inductor {key}={value}: give an integer (0 / 1 for on / off)")
            setattr(inductor, key, type(getattr(inductor, key))(int(value)))
    if a.smoke:
        return smoke(a.smoke_tokenizer, a.smoke_backend)
    if a.model is None:
        p.error("--model is required")
    if a.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(a.cache_dir)
    from inference.errors import UserError

    try:
        result = run(a.model, a.impl, a.new_tokens, a.repeats, profile_tokens=a.profile)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if options:
        result["inductor"] = options
        result["label"] += " " + ",".join(f"{k}={v}" for k, v in options.items())
    print(f"RESULT decode {result['label']}: first call {result['first_call_s']:.2f} s "
          f"(load {result['load_s']:.1f} s), "
          f"{result['tokens_per_s']:.0f} tok/s per reply, {result['ms_per_token']:.2f} ms/token decode, "
          f"ttft {result['ttft_s'] * 1000:.0f} ms, {result['new_tokens']} tokens", flush=True)
    if result["profile"] and "error" not in result["profile"]:
        print(f"PROFILE {result['label']}: {result['profile']['kernels_per_token']:.0f} kernels/token, "
              f"{result['profile']['device_ms_per_token']:.2f} ms/token of kernel time", flush=True)
    print(table([result]))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
