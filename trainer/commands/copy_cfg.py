"""Copy a shipped preset into a directory to edit it, like `xtuner copy-cfg`.

    python -m trainer copy-cfg NAME DIR        # writes DIR/NAME_copy.yaml
    python -m trainer train DIR/NAME_copy.yaml --data my.jsonl
"""
from __future__ import annotations

import argparse

from trainer.engine.config import copy_cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer copy-cfg", description=__doc__.split("\n")[0])
    p.add_argument("name", help="preset name (see list-cfg)")
    p.add_argument("dir", help="directory to copy it into")
    args = p.parse_args(argv)
    dst = copy_cfg(args.name, args.dir)
    print(f"copied preset {args.name!r} to {dst} -- train it with `python -m trainer train {dst}`")
    return 0
