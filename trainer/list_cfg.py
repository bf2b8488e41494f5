"""List the shipped training presets, like `xtuner list-cfg`.

    python -m trainer list-cfg [-p PATTERN]

One line per preset: its name (what `train` and `copy-cfg` take) and what it is for.
"""
from __future__ import annotations

import argparse

from trainer.config import describe_preset, list_cfg
from trainer.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer list-cfg", description=__doc__.split("\n")[0])
    p.add_argument("-p", "--pattern", help="only presets whose name contains this (case-insensitive)")
    args = p.parse_args(argv)
    names = list_cfg(args.pattern)
    if not names:
        raise UserError(f"no preset matches {args.pattern!r} -- run `python -m trainer list-cfg` to see all")
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe_preset(name)}")
    return 0
