"""The fused loss's chunk on the CPU: cross-entropy alone, with the KL toward the base computed apart, with it sharing
the cross-entropy's logits, and with the chunks' elementwise work compiled (trainer/engine/speed.py, retain.py).

    OMP_NUM_THREADS=2 python bench/cpu_loss.py --rows 400 --kl-rows 200 --out cpu_loss.json

Random bf16 hidden states and output embedding of SmolLM2-135M's shape (576 x 49,152; --dim / --vocab), ROWS labelled
positions of which the first KL_ROWS are also held to the base; each variant runs forward and backward REPEATS times
after one untimed run (the compiled one compiles there). Prints a table (median ms, min-max) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.engine import speed  # noqa: E402  (bench/ is a folder of scripts)
from trainer.engine.retain import kl_to_base  # noqa: E402


def variants(h, w, t, base, scale):
    k = base.shape[0]
    plain = lambda: speed.ChunkedLinearCrossEntropy.apply(h, w, t, speed.CHUNK_ELEMENTS // w.shape[0])[0]
    apart = lambda: plain() + scale * kl_to_base(h[:k], base, w)
    shared = lambda m=None: speed.ChunkedLinearCrossEntropy.apply(
        h, w, t, speed.CHUNK_ELEMENTS // w.shape[0], base, torch.tensor(scale), m)[0]
    return {"cross-entropy alone": plain, "+ KL computed apart (before)": apart, "+ KL sharing the logits": shared,
            "+ KL sharing the logits, chunks compiled": lambda: shared(speed.compiled_chunk_math())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--kl-rows", type=int, default=200)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    w = (torch.randn(a.vocab, a.dim) * 0.02).bfloat16()
    h = torch.randn(a.rows, a.dim).bfloat16().requires_grad_(True)
    t = torch.randint(0, a.vocab, (a.rows,))
    base = torch.randn(a.kl_rows, a.dim).bfloat16()
    results = {}
    for name, fn in variants(h, w, t, base, 0.5 / a.kl_rows).items():
        fn().backward()                                   # untimed: allocations, compiling
        if "compiled" in name and speed.compiled_chunk_math() is None:
            continue                                      # compiling failed here (said in the log): eager again
        times = []
        for _ in range(a.repeats):
            h.grad = None
            t0 = time.perf_counter()
            fn().backward()
            times.append((time.perf_counter() - t0) * 1000)
        results[name] = {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
                         "max_ms": round(max(times), 1)}
    print(f"| {a.rows} rows ({a.kl_rows} with the KL), vocabulary {a.vocab:,} | ms, median (min-max) |\n|---|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['median_ms']} ({r['min_ms']}-{r['max_ms']}) |")
    if a.out:
        a.out.write_text(json.dumps({"rows": a.rows, "kl_rows": a.kl_rows, "vocab": a.vocab, "dim": a.dim,
                                     "results": results, "threads": torch.get_num_threads(), "torch": torch.__version__,
                                     "cpu": platform.processor() or platform.machine(),
                                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
