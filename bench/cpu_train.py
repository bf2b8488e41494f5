"""CPU LoRA training speed of the shipped real-base preset: tokens/s of the first epoch and of the later ones.

    python -m trainer data --name Lumi --author 小菜鸡 --n 100 --mix self --model smollm2 --ratio 0.25 --out d.jsonl
    OMP_NUM_THREADS=2 python bench/cpu_train.py --data d.jsonl --steps 70 --out cpu_train.json
    OMP_NUM_THREADS=2 python bench/cpu_train.py --data d.jsonl --steps 70 --no-hidden-cache    # the engine before
    OMP_NUM_THREADS=2 python bench/cpu_train.py --data d.jsonl --steps 70 --set attn_implementation=eager
    OMP_NUM_THREADS=2 python bench/cpu_train.py --data d.jsonl --steps 70 --set compile=false  # before session 16
    python bench/cpu_train.py --smoke            # the tiny base, its preset, 6 steps over 2 epochs

Trains `smollm2_135m_lora` (the demo's preset: bf16 frozen weights on CPUs that multiply bf16 natively, the KL term
toward the base) for --steps optimizer steps on --data and reads the run's `scalars.jsonl`, logged every step. The
epochs differ: with `retain_kl` on, the first epoch reads each general row with the base too, the later ones reuse the
base's hidden states (`trainer/engine/retain.py`); `--no-hidden-cache` recomputes them every epoch, as before. Prints a
table and writes JSON: per-window tokens/s (tokens over elapsed seconds between two logged steps; the collator counts a
batch's tokens when it builds it, which may be a batch ahead, so a window is exact to one batch), every step's seconds,
the loss at the last step, machine and versions.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def windows(scalars: list[dict], epoch_steps: int, skip: int) -> dict:
    """Tokens/s of the first epoch after SKIP warm-up steps and of the steps after it, with every step's seconds."""
    by = {r["step"]: r for r in scalars}
    last = max(by)

    def rate(a: int, b: int) -> float | None:
        if a not in by or b not in by or b <= a:
            return None
        return round((by[b]["tokens"] - by[a]["tokens"]) / (by[b]["elapsed_s"] - by[a]["elapsed_s"]), 1)
    steps = [round(by[s]["elapsed_s"] - by[s - 1]["elapsed_s"], 3)
             for s in range(2, last + 1) if s in by and s - 1 in by]
    first_end = min(epoch_steps, last)
    return {"epoch_steps": epoch_steps, "first_epoch_tok_s": rate(min(skip, first_end - 1), first_end),
            "later_epochs_tok_s": rate(first_end, last), "step_s": steps,
            "step_s_median": statistics.median(steps) if steps else None, "last_loss": by[last]["loss"]}


def run(data: Path, steps: int, preset: str, model: str | None, hidden_cache: bool, work: Path,
        sets: tuple[str, ...] = ()) -> dict:
    import torch
    import transformers

    import trainer.engine.retain as retain
    from trainer.engine.config import load_config
    from trainer.engine.train import train

    if not hidden_cache:
        retain.HIDDEN_CACHE_BYTES = 0
    overrides = {"data": [str(data)], "work_dir": str(work)}
    if model:
        overrides["model"] = model
    cfg = load_config(preset, overrides, [*sets, f"max_steps={steps}", "save_steps=0", "logging_steps=1",
                                          "evaluation_inputs=[]"])
    rows = sum(1 for line in data.read_text(encoding="utf-8").splitlines() if line.strip())
    t0 = time.perf_counter()
    train(cfg, echo=lambda s: print(s, flush=True))
    scalars = [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines()]
    epoch_steps = math.ceil(rows / (cfg.batch_size * cfg.grad_accum))
    res = windows(scalars, epoch_steps, skip=min(10, max(1, min(epoch_steps, steps) // 3)))
    res.update(preset=preset, sets=list(sets), steps=steps, rows=rows, hidden_cache=hidden_cache,
               retain_kl=cfg.retain_kl, attn=cfg.attn_implementation,
               wall_s=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads(), cpu=platform.processor()
               or platform.machine(), torch=torch.__version__, transformers=transformers.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    return res


def table(res: dict) -> str:
    cache = "kept" if res["hidden_cache"] else "recomputed"
    return "\n".join([
        "| preset | --set | steps | hidden cache | first epoch tok/s | later epochs tok/s | s/step median | loss at end |",
        "|---|---|---:|---|---:|---:|---:|---:|",
        f"| {res['preset']} | {' '.join(res['sets']) or '-'} | {res['steps']} | {cache} | {res['first_epoch_tok_s']} | "
        f"{res['later_epochs_tok_s']} | {res['step_s_median']} | {res['last_loss']:.4f} |"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path)
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--preset", default="smollm2_135m_lora")
    p.add_argument("--model", help="model dir (default: the preset's)")
    p.add_argument("--no-hidden-cache", action="store_true", help="recompute the base's hidden states every epoch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a preset field, as `train --set`")
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true", help="the tiny base and its general mix, 6 steps, retain_kl on")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.smoke:
            from trainer.bases.registry import resolve_model
            from trainer.commands.data import main as data_main

            a.data, a.steps, a.model = tmp / "d.jsonl", 6, str(resolve_model("tiny"))
            data_main(["--name", "Lumi", "--author", "Ada", "--n", "12", "--mix", "general", "--ratio", "0.5",
                       "--out", str(a.data)])
        if a.data is None:
            p.error("--data is required (or --smoke)")
        res = run(a.data, a.steps, a.preset, a.model, not a.no_hidden_cache, tmp / "work", tuple(a.set))
    print(table(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
