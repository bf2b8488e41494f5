"""List the shipped training presets, like `xtuner list-cfg`.

    python -m trainer list-cfg [-p PATTERN]

One line per preset: its name (what `train` and `copy-cfg` take) and what it is for, which is the
first sentence of the preset's header comment.
"""
from __future__ import annotations

import argparse
import re

from trainer.engine.config import PRESET_DIR, list_cfg
from inference.errors import UserError

# a sentence ends at . ! ? (maybe closing a bracket) before a space or the end; "e.g." / "i.e." do not
# end one, nor do dots inside words and numbers ("1.8B", "config.yaml")
SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)[.!?]\)?(?=\s|$)")


def first_sentence(text: str) -> str:
    """The first sentence of `text` (all of it when none ends): a header comment's first line is often
    cut mid-sentence by the line width, so a line is not a sentence."""
    text = " ".join(text.split())
    end = SENTENCE_END.search(text)
    return text[:end.end()] if end else text


def describe(name: str) -> str:
    """What a preset is for: the first sentence of its header comment, before any command lines."""
    prose = []
    for line in (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        body = line[1:] if line.startswith("#") else None
        if body is None or body.startswith("  ") or body.strip().startswith("Run:"):
            break                          # the header ends, or its commands begin
        prose.append(body)
    return first_sentence(" ".join(prose))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer list-cfg", description=first_sentence(__doc__))
    p.add_argument("-p", "--pattern", help="only presets whose name contains this (case-insensitive)")
    args = p.parse_args(argv)
    names = list_cfg(args.pattern)
    if not names:
        raise UserError(f"no preset matches {args.pattern!r} -- run `python -m trainer list-cfg` to see all")
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe(name)}")
    return 0
