"""Prefill on CPU: one forward pass over a prompt of N tokens with the fp32 model and with the int8 / int4 decode
copy the apps use (inference/cpu_decode.py) -- what int4's faster decoding costs in time to the first token.

    OMP_NUM_THREADS=2 python bench/cpu_prefill.py --model work_dirs/demo/merged --weights fp32,int4 \
        --lengths 64,512,1536 --repeats 3 --out prefill.json
    python bench/cpu_prefill.py --smoke          # the tiny base, short prompts

Each row: the median of --repeats timed passes after an untimed one (random token ids, no cache kept), and the
seconds the copy took to make (quantizing, with int4's low-rank residual).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(model: str, weights: list[str], lengths: list[int], repeats: int) -> dict:
    import torch
    import transformers

    from inference import load
    from inference.cpu_decode import decode_model
    from trainer.bases.registry import resolve_model

    loaded = load(str(resolve_model(model)), device="cpu")
    vocab = loaded.model.config.vocab_size
    result = {"model": model, "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "repeats": repeats, "date": time.strftime("%Y-%m-%d %H:%M"),
              "rows": []}
    gen = torch.Generator().manual_seed(0)
    for w in weights:
        t0 = time.perf_counter()
        m = decode_model(loaded.model, w)
        made = time.perf_counter() - t0
        for n in lengths:
            ids = torch.randint(0, vocab, (1, n), generator=gen)
            with torch.no_grad():
                m(ids, use_cache=False)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    m(ids, use_cache=False)
                    times.append(time.perf_counter() - t0)
            row = {"weights": w, "tokens": n, "copy_s": round(made, 2), "seconds": [round(t, 4) for t in times],
                   "median_s": round(statistics.median(times), 4)}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    return result


def table(res: dict) -> str:
    fp32 = {r["tokens"]: r["median_s"] for r in res["rows"] if r["weights"] == "fp32"}
    lines = [f"{res['model']}, {res['threads']} threads, torch {res['torch']}, {res['date']}, "
             f"median of {res['repeats']}",
             "| weights | prompt tokens | prefill s (min-max) | x fp32 | copy made in s |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        ratio = f"{r['median_s'] / fp32[r['tokens']]:.2f}" if r["tokens"] in fp32 else "-"
        lines.append(f"| {r['weights']} | {r['tokens']} | {r['median_s']:.3f} ({min(r['seconds']):.3f}-"
                     f"{max(r['seconds']):.3f}) | {ratio} | {r['copy_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="a model dir or a base name (smollm2, tiny)")
    p.add_argument("--weights", default="fp32,int4", help="fp32, int8, int4, comma-separated")
    p.add_argument("--lengths", default="64,512,1536")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true", help="the tiny base, 16 and 32 tokens, one repeat")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.lengths, a.repeats = (a.model if a.model != "smollm2" else "tiny"), "16,32", 1
    from inference.cpu_decode import check

    res = run(a.model, [check(w.strip()) for w in a.weights.split(",")], [int(n) for n in a.lengths.split(",")],
              a.repeats)
    print(table(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
