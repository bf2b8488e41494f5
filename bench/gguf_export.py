"""GGUF export of the real embedded base (SmolLM2-135M-Instruct) at each quant: file size and export time.

    OMP_NUM_THREADS=1 python bench/gguf_export.py --out gguf_export.json          # 3 repeats per quant
    python bench/gguf_export.py --model work_dirs/me/merged --quants q8_0 --repeats 5

Each repeat is one `export_gguf` call (trainer/export/gguf_export.py) into a fresh temp dir, the way
`python -m trainer export-gguf` runs it minus the process start: read config + tokenizer, convert and
quantize every tensor through gguf.quants, write the file and the Modelfile. Progress bars off. The
table gives the median and the spread (min-max) of the repeats; the JSON adds every time, the machine
and the versions.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUANTS = ("f16", "bf16", "q8_0", "q4_0")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    versions = {p: importlib.metadata.version(p) for p in ("gguf", "transformers", "torch", "numpy", "safetensors")}
    return {"cpu": cpu, "cores": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "versions": versions, "date": datetime.date.today().isoformat()}


def run(model: Path, quants, repeats: int) -> list[dict]:
    from trainer.export.gguf_export import export_gguf

    rows = []
    for quant in quants:
        times, size = [], None
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
                out = Path(tmp) / f"model-{quant}.gguf"
                t0 = time.perf_counter()
                export_gguf(model, out, quant=quant, progress=False, echo=lambda s: None)
                times.append(time.perf_counter() - t0)
                size = out.stat().st_size
        rows.append({"quant": quant, "bytes": size, "mb": size / 2**20, "seconds": times,
                     "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)})
        print(f"  {quant}: {size / 2**20:.1f} MB, {statistics.median(times):.2f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| quant | file size (MB) | export (s), median | spread (min-max) |", "|---|---:|---:|---|"]
    lines += [f"| {r['quant']} | {r['mb']:.1f} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a merged model dir (default: the real embedded base, imported once)")
    p.add_argument("--quants", nargs="+", default=list(QUANTS), choices=QUANTS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.model:
        model = Path(args.model)
    else:
        from inference.gguf_import import embedded_base

        model = embedded_base()
    print(f"exporting {model} x{args.repeats} per quant", flush=True)
    rows = run(model, args.quants, args.repeats)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": str(model), "repeats": args.repeats, "machine": machine(),
                                              "results": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
