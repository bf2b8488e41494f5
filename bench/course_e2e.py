"""The course's job end to end, timed: `train` with its preset and data volume, then `merge`.

    python bench/course_e2e.py --model /tmp/bench/model-internlm2-1.8b --data /tmp/bench/data.jsonl \\
        --work /tmp/bench/runs/course [--set fused_loss=true ...] [--merge-to]

The course fine-tunes InternLM2-Chat-1.8B with QLoRA on 10,001 short identity conversations for 2
epochs at max_length 1024 (the `internlm2_chat_1_8b_qlora` preset), then merges the adapter. Both are
run as the user runs them (fresh processes, so start-up, loading and quantization are counted);
`--set` passes speed settings to `train`; `--merge-to` merges inside the training process (`train --merge-to`)
instead of a second `merge` process. Prints and writes the seconds of each part.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--merge-to", action="store_true", help="merge in the training process (train --merge-to)")
    a = p.parse_args(argv)
    train = [sys.executable, "-m", "trainer", "train", "internlm2_chat_1_8b_qlora", "--model", a.model,
             "--data", a.data, "--work-dir", str(a.work), *(x for kv in a.sets for x in ("--set", kv))]
    merged = a.work.parent / f"{a.work.name}-merged"
    if a.merge_to:
        jobs = [("train", train + ["--merge-to", str(merged), "--merge-dtype", "bf16"])]
    else:
        jobs = [("train", train), ("merge", [sys.executable, "-m", "trainer", "merge", a.model, str(a.work / "final"),
                                             str(merged), "--device", "cuda", "--dtype", "bf16"])]
    times = {"merge_s": 0.0}
    for name, cmd in jobs:
        print("+", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=REPO)
        times[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            print(f"RESULT course_e2e: {name} failed (exit {rc})")
            return 1
    times["total_s"] = round(times["train_s"] + times["merge_s"], 1)
    scalars = [json.loads(x) for x in (a.work / "scalars.jsonl").read_text().splitlines() if x.strip()]
    times.update(steps=scalars[-1]["step"], peak_gib=max(r["peak_gib"] for r in scalars), sets=a.sets,
                 merged_in_process=a.merge_to)
    (a.work / "e2e.json").write_text(json.dumps(times, indent=1))
    how = "train and merge in one process" if a.merge_to else f"train {times['train_s']} s + merge {times['merge_s']} s"
    print(f"RESULT course_e2e: {how} = {times['total_s']} s "
          f"({times['steps']} steps, peak {times['peak_gib']} GiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
