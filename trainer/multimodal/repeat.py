"""Repeat a small data set N times (the course's `repeat.py`): a handful of image conversations
becomes enough steps for the projector and LoRA to learn them.

    python -m trainer repeat data/unique_data.json data/repeated_data.json -n 200

Input: a JSON array or JSONL file (any record format; records are copied unchanged). Output: a JSON
array when OUT ends in `.json`, else JSONL; written atomically, so a failure leaves no partial file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from inference.atomic import new_file
from trainer.data.formats import read_records, write_jsonl
from inference.errors import UserError


def repeat(src, out, n: int) -> int:
    """Write the records of `src` `n` times over into `out`; returns the number written."""
    if n < 1:
        raise UserError(f"-n {n}: must be >= 1")
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise UserError(f"{out}: output is the input file -- choose another output path")
    records = [rec for _, rec in read_records(src)] * n
    if out.suffix == ".json":
        with new_file(out) as f:          # whole or not at all, with a plain file's permissions
            json.dump(records, f, ensure_ascii=False, indent=1)
    else:
        write_jsonl(out, records)
    return len(records)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer repeat", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="JSON array or JSONL data file")
    p.add_argument("output", help="output file (.json: JSON array, otherwise JSONL)")
    p.add_argument("-n", type=int, required=True, help="how many times to repeat the data set")
    args = p.parse_args(argv)
    count = repeat(args.input, args.output, args.n)
    print(f"wrote {count} records to {args.output}")
    return 0
