"""`python -m publish COMMAND ...`: put your assistant online.

    model       push a model dir (weights via git-lfs, model card) to openxlab:, hf: or git:
    app         push the chat front end (app.py + inference core, Space README) with MODEL_REPO preset

Targets: openxlab:USER/REPO (OPENXLAB_USER, OPENXLAB_TOKEN), hf:USER/REPO (HF_TOKEN, HF_ENDPOINT),
git:URL_OR_PATH (your git setup). `python -m publish COMMAND -h` shows the flags.
"""
from __future__ import annotations

import importlib
import sys

from inference.errors import run_cli

COMMANDS = {
    "model": "publish.model",
    "app": "publish.app_bundle",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r} -- one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_cli(importlib.import_module(COMMANDS[name]).main, rest)


if __name__ == "__main__":
    sys.exit(main())
