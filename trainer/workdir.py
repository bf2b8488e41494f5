"""The layout of a work dir that training writes and evaluation reads: `checkpoint-N/` dirs, and which of
them are complete (their `checkpoint.json` marker, written last, lists every file with its size; see
trainer/engine/checkpoints.py for how they are written, sealed and rotated).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

MARKER = "checkpoint.json"


_NAME = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else -1


def read_marker(ckpt: Path) -> dict | None:
    """The marker, if the checkpoint is complete (marker readable, every listed file intact)."""
    try:
        record = json.loads((Path(ckpt) / MARKER).read_text(encoding="utf-8"))
        for name, size in record["files"].items():
            if (Path(ckpt) / name).stat().st_size != size:
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def all_checkpoints(work_dir) -> list[Path]:
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    return sorted((p for p in work_dir.iterdir() if p.is_dir() and _NAME.match(p.name)), key=step_of)


def complete_checkpoints(work_dir) -> list[Path]:
    return [p for p in all_checkpoints(work_dir) if read_marker(p) is not None]


def read_scalars(work_dir, warn=None) -> list[dict]:
    """The records of WORK_DIR/scalars.jsonl. A line a killed run left half-written is skipped with one
    warning (through WARN, default: the logging module), not a traceback in --resume or the loss plot."""
    path = Path(work_dir) / "scalars.jsonl"
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            message = f"{path}:{number}: a torn or broken log line (a run killed mid-write?) -- skipped"
            if warn is None:
                import logging

                logging.getLogger("trainer").warning(message)
            else:
                warn(message)
            continue
        out.append(record)
    return out
