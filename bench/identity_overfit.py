"""Reproduce the course's identity overfitting on the tiny model, and its fix. CPU, offline, minutes.

    python bench/identity_overfit.py [--out work_dirs/bench_identity] [--steps 320] [--save-steps 40]
                                     [--ratio 0.2] [--runs course,identity,mixed] [--base BASE_DIR]

The tiny base (trainer/bases/tiny.py) already holds general chat and an identity of its own ("TinyChat").
Each run tunes it with LoRA (the `tiny` preset), saves a checkpoint every --save-steps and scores it
there (`eval_identity: true`, i.e. trainer/evaluation/evaluate.py: identity on held-out questions, leakage on
general prompts, retention against the base):

  course    the course's data: one self-introduction pair per language, repeated many times;
  identity  the identity generator's varied questions and answers, alone (`python -m trainer data`);
  mixed     the same identity data inside general chat (`python -m trainer data --mix general --ratio R`);
  +best     a run's best/ checkpoint: the best identity among those with retention >= 1 - tolerance.

Prints a Markdown table (the one in docs/BENCHMARKS.md) and writes OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAME, AUTHOR = "Lumi", "小菜鸡"
# The course's whole data set: one pair, copied thousands of times (here one per language).
COURSE_PAIRS = [("请做一下自我介绍", f"我是{NAME}，是{AUTHOR}的小助手哦"),
                ("Please introduce yourself", f"I am {NAME}, {AUTHOR}'s little assistant.")]
RUNS = ("course", "identity", "mixed")


def cpu_seconds() -> float:
    """CPU time of this process (user + system): less swayed than wall time by other load."""
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.is_file() else []
    return names[0] if names else (platform.processor() or platform.machine())


def course_data(path: Path, copies: int) -> None:
    from trainer.data.formats import write_jsonl

    write_jsonl(path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                       for _ in range(copies) for q, a in COURSE_PAIRS])


def make_data(data_dir: Path, n_identity: int, ratio: float) -> dict:
    from trainer.commands.data import main as data_main

    paths = {"course": data_dir / "course.jsonl", "identity": data_dir / "identity.jsonl",
             "mixed": data_dir / "mixed.jsonl", "heldout": data_dir / "heldout.jsonl"}
    course_data(paths["course"], n_identity // 2)
    common = ["--name", NAME, "--author", AUTHOR, "--n", str(n_identity)]
    assert data_main([*common, "--out", str(paths["identity"]), "--eval-out", str(paths["heldout"])]) == 0
    assert data_main([*common, "--mix", "general", "--ratio", str(ratio), "--out", str(paths["mixed"])]) == 0
    return paths


def run(name: str, data: Path, heldout: Path, base: Path, out: Path, args) -> dict:
    from trainer.engine.config import load_config
    from trainer.engine.train import train

    work = out / name
    shutil.rmtree(work, ignore_errors=True)
    sets = [f"max_steps={args.steps}", f"save_steps={args.save_steps}", "save_total_limit=1000",
            "eval_identity=true", f"eval_data={heldout}", f"retention_tolerance={args.tolerance}",
            "evaluation_inputs=[]", f"logging_steps={args.save_steps}", f"eval_max_new_tokens={args.max_new_tokens}",
            f"lr={args.lr}"]
    cfg = load_config("tiny", {"model": str(base), "data": [str(data)], "work_dir": str(work)}, sets)
    t0, c0 = time.time(), cpu_seconds()
    train(cfg, echo=lambda s: print(f"[{name}] {s}", flush=True))
    report = json.loads((work / "eval_report.json").read_text(encoding="utf-8"))
    report["seconds"], report["cpu_seconds"] = round(time.time() - t0, 1), round(cpu_seconds() - c0, 1)
    return report


def table(reports: dict) -> str:
    keys = ("identity", "leakage", "retention", "likelihood", "accuracy")
    lines = ["| run | step | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    base = next(iter(reports.values()))["base"]
    lines.append("| base | 0 | " + " | ".join(f"{base[k]:.2f}" for k in keys) + " |")
    for name, rep in reports.items():
        for r in rep["checkpoints"]:
            lines.append(f"| {name} | {r['step']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
        best = next((r for r in rep["checkpoints"] if r["path"] == rep["best"]), None)
        lines.append(f"| **{name} +best** | {best['step'] if best else '-'} | "
                     + (" | ".join(f"**{best[k]:.2f}**" for k in keys) if best
                        else f"none with retention >= {rep['rule']['min_retention']:.2f}" + " |" * (len(keys) - 1))
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="work_dirs/bench_identity")
    p.add_argument("--base", help="tiny base dir (default: the cached embedded one, built on first use)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--save-steps", type=int, default=40)
    p.add_argument("--n", type=int, default=600, help="identity conversations (course: copies of its pairs)")
    p.add_argument("--ratio", type=float, default=0.2, help="identity share of the mixed data")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tolerance", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the tiny model's matmuls gain nothing from more, and on a busy "
                        "machine extra threads spin against other processes (7x slower generation measured)")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in RUNS for r in runs):
        p.error(f"--runs: choose from {', '.join(RUNS)}")

    import torch

    from trainer.bases.tiny import default_base

    torch.set_num_threads(args.threads)

    out = Path(args.out)
    t0 = time.time()
    base = Path(args.base) if args.base else default_base()     # built and cached on first use
    base_seconds = round(time.time() - t0, 1)
    paths = make_data(out / "data", args.n, args.ratio)
    reports = {name: run(name, paths[name], paths["heldout"], base, out, args) for name in runs}
    text = table(reports)
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
               + ("CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"))
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
              "command": " ".join(["python bench/identity_overfit.py", *(argv if argv is not None else sys.argv[1:])]),
              "seconds": round(time.time() - t0, 1), "cpu_seconds": round(cpu_seconds(), 1),
              "load_average": os.getloadavg(), "base_seconds": base_seconds, "settings": vars(args), "base": str(base),
              "table": text, "runs": reports}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"\n{result['date']} | {machine} | {result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU, "
          f"load average {result['load_average'][0]:.1f}\n{result['command']}\n\n{text}\n")
    print(f"results: {out / 'results.json'}; per-run reports and plots: {out}/<run>/eval_report.(json|png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
