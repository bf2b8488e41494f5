"""`python -m trainer self-answers`: (re)make the bundled file of a base's own answers to the bundled prompts.

    python -m trainer self-answers smollm2           # -> trainer/data/self_answers/smollm2-135m-instruct-v2.json
    python -m trainer self-answers MODEL_DIR --out answers.json

`--mix self` reads such a file instead of generating (trainer/data/self_distill.py), only for the very
weights it was made from (sha256) and the same settings; ~8 minutes for SmolLM2-135M on 2 CPU cores.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer self-answers", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="smollm2", help="embedded base name or model dir (default smollm2)")
    p.add_argument("--out", type=Path, help="file to write (default: trainer/data/self_answers/MODEL_DIR_NAME.json)")
    args = p.parse_args(argv)
    from trainer.bases.registry import resolve_model
    from trainer.data.self_distill import write_bundle

    write_bundle(resolve_model(args.model), args.out, made_by=args.model)
    return 0
