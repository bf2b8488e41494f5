"""`python -m trainer eval`: identity / leakage / retention of a model, an adapter or every checkpoint of a
work dir, and `best/` (the scores: trainer/evaluation/evaluate.py; the report: trainer/evaluation/report.py).

    python -m trainer eval WORK_DIR [--eval-data FILE]             # every checkpoint-N/ and final/, then best/
    python -m trainer eval ADAPTER_DIR --eval-data FILE [--base BASE] [--json FILE]
    python -m trainer eval MERGED_DIR --eval-data FILE [--base BASE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from inference.errors import UserError
from inference.loader import check_json_files, check_model_dir, read_assistant_file
from trainer.bases.registry import BASES, resolve_model
from trainer.evaluation import report as eval_report
from trainer.evaluation.evaluate import (MAX_NEW_TOKENS, N_GENERAL, build_eval_set, checkpoints, evaluate_dirs,
                                         is_adapter, is_work_dir)


def resolve_base(given: str | None, *dirs: Path, required: bool = True) -> Path | None:
    """--base, else what the adapter / work dir recorded (adapter_config, assistant.json, config.yaml).
    `required=False` (a merged model): a recorded base that is no longer there means no base."""
    name = given
    for d in dirs:
        if name:
            break
        if (d / "adapter_config.json").is_file():
            check_json_files(d)
            name = json.loads((d / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        name = name or read_assistant_file(d).get("base_model")
        if not name and (d / "config.yaml").is_file():
            import yaml

            name = (yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) or {}).get("model")
    if not name:
        return None
    if name in BASES:
        return resolve_model(name)
    if not Path(name).is_dir():
        if not (given or required):
            return None
        raise UserError(f"{name}: base model directory not found -- pass --base BASE_DIR")
    return check_model_dir(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer eval", description=__doc__.split("\n")[0])
    p.add_argument("target", metavar="MODEL_OR_WORK_DIR", help="work dir, adapter dir or full model dir")
    p.add_argument("--base", help="base model dir (default: the one recorded with the adapter / run)")
    p.add_argument("--eval-data", help="held-out identity questions JSONL (default: eval_data of the run's config)")
    p.add_argument("--json", help="write the scores here (work dirs: default WORK_DIR/eval_report.json)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="best/ = best identity among checkpoints with retention >= 1 - TOLERANCE (default 0.1)")
    p.add_argument("--general", type=int, default=N_GENERAL, help="number of general prompts")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def _run_config(target: Path) -> dict:
    import yaml

    path = target / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    target = Path(args.target)
    if not target.is_dir():
        raise UserError(f"{target}: not found -- pass a work dir, an adapter dir or a model dir")
    run_cfg = _run_config(target)
    eval_data = args.eval_data or run_cfg.get("eval_data")
    if not eval_data:
        raise UserError("no held-out identity questions: pass --eval-data FILE "
                        "(write one with `python -m trainer data --name ... --out ... --eval-out FILE`)")
    if args.general < 1 or args.max_new_tokens < 1:
        raise UserError("--general and --max-new-tokens must be >= 1")
    tolerance = args.tolerance if args.tolerance is not None else run_cfg.get("retention_tolerance", 0.1)
    if not 0 <= tolerance <= 1:
        raise UserError(f"--tolerance {tolerance}: must be in [0, 1]")
    es = build_eval_set(eval_data, args.general)
    if is_work_dir(target):
        found = checkpoints(target)
        base = resolve_base(args.base, found[0][0], target)
        base_scores, results = evaluate_dirs([d for d, _ in found], base, es, args.device, args.max_new_tokens)
        rows = [eval_report.row(d, step, s) for (d, step), s in zip(found, results)]
        report = eval_report.write_report(target, rows, base_scores, tolerance, es,
                                          json_path=args.json, base_path=base)
        print(eval_report.format_table(rows, base_scores, report["best"]))
        print(f"report: {report['json']}, {report['png']}")
        print(f"best: {report['best']} -> {target / 'best'}" if report["best"]
              else eval_report.no_best_hint(rows, tolerance))
        return 0
    if not is_adapter(target) and not (target / "config.json").is_file():
        raise UserError(f"{target}: not a work dir (no checkpoint-N/ or final/), adapter dir or model dir")
    base = resolve_base(args.base, target, required=is_adapter(target))
    base_scores, (scores,) = evaluate_dirs([target], base, es, args.device, args.max_new_tokens)
    rows = [eval_report.row(target, None, scores)]
    print(eval_report.format_table(rows, base_scores, None))
    if args.json:
        eval_report.write_json(args.json, eval_report.report_dict(rows, base_scores, None, tolerance, es, base))
        print(f"scores written to {args.json}")
    return 0
