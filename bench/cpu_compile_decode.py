"""Batch-1 CPU decode of a model: eager `generate` against `generate` with a static cache and a compiled
forward, with and without inductor's weight freezing, in fp32 and bf16 (or int8 / int4 weights).

    OMP_NUM_THREADS=2 python bench/cpu_compile_decode.py --model smollm2 --dtype bf16 --freeze   # one row
    OMP_NUM_THREADS=2 python bench/cpu_compile_decode.py --model smollm2 --dtype int4           # cpu_decode's int4 copy
    python bench/cpu_compile_decode.py --model smollm2 --all --out cpu_compile.json            # fp32/bf16 rows
    python bench/cpu_compile_decode.py --table cpu_compile.json                                # markdown table

Why: issue 19 asks for >= 40 tokens/s for one stream on 2 cores. The engine's own compiled step
(inference/fast_decode.py, inductor's C++ backend) bought 1.04-1.07x here; inductor's `freezing` folds the
frozen weights into the graph as constants and, for bf16 on x86, packs them for oneDNN's matmuls -- a
different kernel path, measured here before anything in the core changes. Each row: the same prompt, greedy,
`--tokens` new tokens forced (min_new_tokens), `--repeats` timed replies after one untimed; eager first, then
the compiled forward (its first call, compile included, is reported apart); the greedy ids of both are
compared token by token.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPT = "Explain why the sky is blue."
SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def one(model: str, dtype: str, freeze: bool, tokens: int, repeats: int) -> dict:
    import torch
    import torch._inductor.config as inductor_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.bases.registry import resolve_model

    inductor_config.freezing = freeze
    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    m.eval()
    if dtype in ("int8", "int4"):
        from inference.cpu_decode import decode_model

        m = decode_model(m, dtype)        # what `cpu_decode=...` gives the engine
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)

    def reply(**kw):
        t = time.perf_counter()
        with torch.no_grad():
            out = m.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kw)
        return tokens / (time.perf_counter() - t), out[0, ids["input_ids"].shape[1]:].tolist()

    reply()
    eager = [reply() for _ in range(repeats)]
    m.forward = torch.compile(m.forward, dynamic=False)
    t = time.perf_counter()
    reply(cache_implementation="static")
    first = time.perf_counter() - t
    compiled = [reply(cache_implementation="static") for _ in range(repeats)]
    a, b = eager[0][1], compiled[0][1]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return {"dtype": dtype, "freeze": freeze, "threads": torch.get_num_threads(), "tokens": tokens,
            "eager_tok_s": [round(r[0], 2) for r in eager], "compiled_tok_s": [round(r[0], 2) for r in compiled],
            "first_compiled_call_s": round(first, 1), "same_greedy_prefix": same,
            "versions": {"torch": torch.__version__}}


def table(rows: list[dict]) -> str:
    out = ["| weights | freezing | eager generate (tok/s) | compiled, static cache (tok/s) | x eager | first compiled call "
           "| same greedy tokens |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        e, c = sorted(r["eager_tok_s"]), sorted(r["compiled_tok_s"])
        ratio = c[len(c) // 2] / e[len(e) // 2]
        out.append(f"| {r['dtype']} | {'yes' if r['freeze'] else 'no'} | {e[0]:.1f}-{e[-1]:.1f} | {c[0]:.1f}-{c[-1]:.1f} "
                   f"| {ratio:.2f} | {r['first_compiled_call_s']:.0f} s | {r['same_greedy_prefix']} of {r['tokens']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="model dir or embedded base name")
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8", "int4"], default="bf16")
    p.add_argument("--freeze", action="store_true", help="inductor freezing (weights as constants, prepacked)")
    p.add_argument("--all", action="store_true", help="every dtype x freezing, one process each")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path, help="print the markdown table of a JSON written by --all")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(a.table.read_text())["rows"]))
        return 0
    if a.all:
        rows = []
        for dtype, freeze in SETTINGS:
            cmd = [sys.executable, __file__, "--model", a.model, "--dtype", dtype, "--tokens", str(a.tokens),
                   "--repeats", str(a.repeats)] + (["--freeze"] if freeze else [])
            line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(line))
            print(f"{dtype} freeze={freeze}: eager {rows[-1]['eager_tok_s']}, compiled {rows[-1]['compiled_tok_s']}",
                  flush=True)
        print(table(rows))
        if a.out:
            a.out.write_text(json.dumps({"command": " ".join(sys.argv), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                                         "rows": rows}, indent=1))
        return 0
    print(json.dumps(one(a.model, a.dtype, a.freeze, a.tokens, a.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
