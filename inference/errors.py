"""One kind of error for everything a user can get wrong, and the wrapper that prints it.

Every entry point runs through `run_cli(main, argv)`: a `UserError` becomes one line on stderr
(`error: FILE:LINE: what is wrong -- what to do`) and exit code 2; nothing else is caught, so a real
bug still shows its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def where(path, line: int | None = None) -> str:
    """`FILE` or `FILE:LINE`, the prefix every data error starts with."""
    return f"{path}:{line}" if line is not None else f"{path}"


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
