"""The evaluation report of a work dir and the best-checkpoint choice.

Written by `python -m trainer eval WORK_DIR` and, with `eval_identity: true`, by training itself:

* a table (checkpoint x identity / leakage / retention / accuracy), printed;
* `eval_report.json`: `{"checkpoints": [{"path", "step", "identity", "leakage", "retention", ...}],
  "best": path, "base": {...}, "rule": {...}}`;
* `eval_report.png`: the three scores over steps, the retention floor and the chosen checkpoint;
* `best/`: the chosen checkpoint as a loadable adapter (adapter weights + tokenizer + assistant.json).

The rule: among checkpoints whose retention is at least `1 - tolerance` (retention is relative to
the base, which scores 1.0), take the highest identity minus leakage (a checkpoint that names
itself in answers to other questions is the course's failure, so a leak costs as much as a missed
identity question); ties go to lower leakage, then higher retention, then the earlier step. None
qualifies -> no best/ (the table says why).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from inference.atomic import new_dir, write_text

SCORE_KEYS = ("identity", "identity_by_lang", "leakage", "leakage_by_lang", "retention", "retention_by_lang",
              "likelihood", "accuracy", "known")
# Training state a checkpoint carries that a loadable model does not need.
TRAINING_ONLY = {"optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin",
                 "checkpoint.json"}


def row(path, step: int | None, scores) -> dict:
    d = scores.as_dict()
    return {"path": str(path), "step": step, **{k: d[k] for k in SCORE_KEYS}, "examples": d["examples"]}


def choose_best(rows: list[dict], tolerance: float) -> dict | None:
    floor = 1.0 - tolerance
    ok = [r for r in rows if r.get("retention") is not None and r["retention"] >= floor - 1e-9]
    if not ok:
        return None
    return max(ok, key=lambda r: (round(r["identity"] - r["leakage"], 6), -r["leakage"], r["retention"],
                                  -(r["step"] if r["step"] is not None else float("inf"))))


def no_best_hint(rows: list[dict], tolerance: float, option: str = "--tolerance {}") -> str:
    """One line for "no checkpoint qualified": why, and what the user can do about it. `option` is how
    the tolerance is set where the line is shown (`eval --tolerance`, or a training config key)."""
    kept = [r for r in rows if r.get("retention") is not None]
    if not kept:
        return "best: none -- no retention without a base model to compare with: pass --base BASE_DIR"
    top = max(kept, key=lambda r: r["retention"])
    # the smallest tolerance, in steps of 0.05, under which the best-kept checkpoint would qualify
    enough = min(1.0, math.ceil(round((1.0 - top["retention"]) * 20, 6)) / 20)
    return (f"best: none within tolerance -- the most any checkpoint kept of the base is {top['retention']:.2f} "
            f"({Path(top['path']).name}), under the floor {1.0 - tolerance:.2f}; to accept that much forgetting "
            f"pass {option.format(f'{enough:.2f}')}, or forget less: mix in more general data "
            "(`python -m trainer data ... --mix general --ratio 0.3`), train fewer epochs or save checkpoints earlier")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict], base=None, best: str | None = None) -> str:
    """A Markdown table; the chosen checkpoint is marked with *."""
    lines = ["| checkpoint | step | identity | leakage | retention | likelihood | accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    if base is not None:
        lines.append(f"| base | 0 | {_fmt(base.identity)} | {_fmt(base.leakage)} | 1.00 | 1.00 | {_fmt(base.accuracy)} |")
    for r in rows:
        mark = " *" if best and r["path"] == best else ""
        lines.append(f"| {Path(r['path']).name}{mark} | {_fmt(r['step'])} | {_fmt(r['identity'])} | "
                     f"{_fmt(r['leakage'])} | {_fmt(r['retention'])} | {_fmt(r['likelihood'])} | {_fmt(r['accuracy'])} |")
    return "\n".join(lines)


def report_dict(rows, base, best, tolerance, es, base_path=None) -> dict:
    return {
        "checkpoints": rows, "best": best["path"] if best else None,
        "base": None if base is None else {"path": str(base_path) if base_path else None, **{
            k: v for k, v in base.as_dict().items() if k in SCORE_KEYS}},
        "rule": {"tolerance": tolerance, "min_retention": round(1.0 - tolerance, 4),
                 "pick": "highest identity - leakage with retention >= min_retention"},
        "eval_data": es.source, "n_identity": len(es.identity), "n_general": len(es.general),
    }


def write_json(path, data: dict) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2))


def plot(rows: list[dict], path, tolerance: float, best: str | None = None, base=None, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["step"] is not None]
    pts = list({r["step"]: r for r in pts}.values())        # final/ repeats the last step
    if base is not None:
        pts = [{"step": 0, "identity": base.identity, "leakage": base.leakage, "retention": 1.0,
                "path": "base"}] + pts
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=110)
    steps = [r["step"] for r in pts]
    for key, color in (("identity", "tab:blue"), ("leakage", "tab:red"), ("retention", "tab:green")):
        ax.plot(steps, [r[key] if r[key] is not None else float("nan") for r in pts], "o-", color=color, label=key)
    ax.axhline(1.0 - tolerance, color="tab:green", linestyle=":", linewidth=1, label="retention floor")
    chosen = [r for r in pts if r["path"] == best]
    if chosen:
        ax.axvline(chosen[0]["step"], color="gray", linestyle="--", linewidth=1, label="best")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_best(src, work_dir) -> Path:
    """Copy a checkpoint's loadable files (not its optimizer state) to WORK_DIR/best, atomically."""
    src, work_dir = Path(src), Path(work_dir)
    dst = work_dir / "best"
    with new_dir(dst, replace=True) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in TRAINING_ONLY and not f.name.startswith("rng_state"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "best_of.json").write_text(json.dumps({"source": str(src)}, ensure_ascii=False), encoding="utf-8")
    return dst


def write_report(work_dir, rows: list[dict], base, tolerance: float, es, json_path=None, base_path=None,
                 copy_best: bool = True) -> dict:
    """JSON + PNG in the work dir, and best/ from the chosen checkpoint. Returns what was written."""
    work_dir = Path(work_dir)
    best = choose_best(rows, tolerance)
    json_path = Path(json_path) if json_path else work_dir / "eval_report.json"
    write_json(json_path, report_dict(rows, base, best, tolerance, es, base_path))
    png = work_dir / "eval_report.png"
    plot(rows, png, tolerance, best["path"] if best else None, base, title=f"{work_dir.name}: identity vs. overfitting")
    if best and copy_best and Path(best["path"]).is_dir():
        write_best(best["path"], work_dir)
    elif best is None and copy_best and (work_dir / "best" / "best_of.json").is_file():
        shutil.rmtree(work_dir / "best")        # a stale choice from an earlier report would mislead
    return {"json": str(json_path), "png": str(png), "best": best["path"] if best else None}
