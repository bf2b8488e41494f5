"""Write files and directories so that a crash or an error never leaves one half-written.

    with new_dir(out) as tmp:          # fill tmp; on success it becomes `out`, on error it is removed
        model.save_pretrained(tmp)
    with new_dir(out, replace=True) as tmp:     # the same, swapping out an older `out`
        model.save_pretrained(tmp)
    with new_file(path) as f:          # a text file written beside `path` and renamed over it
        f.write(text)
    replace_dir(finished, dst)         # move a finished dir over an older one

Everything is written next to its destination (same filesystem), so the final `os.replace` is a rename.
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from trainer.errors import UserError


def _beside(path: Path) -> Path:
    # not tempfile.mkstemp/mkdtemp: those create 0600/0700, and a model dir or data file written here
    # should get the usual permissions (umask), like one written directly
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def check_new_dir(out) -> Path:
    """Refuse an output dir that already holds something: we never write over a user's files."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: already exists and is not empty -- choose a new directory")
    return out


@contextmanager
def new_dir(out, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary dir beside `out`; when the block ends cleanly it is renamed to `out`,
    when it raises it is deleted. `out` must be missing or empty, unless `replace` (then an old `out`
    is swapped out only once the new one is complete)."""
    out = Path(out) if replace else check_new_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(out)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def new_file(path, mode: str = "w") -> Iterator[IO]:
    """Yield a file opened on a temporary name beside `path` (UTF-8 in text mode); when the block ends
    cleanly it is flushed to disk and renamed over `path`, when it raises it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path)
    try:
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())      # a rename that lands before the data would leave an empty file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> Path:
    """`path.write_text(text)`, atomically."""
    with new_file(path) as f:
        f.write(text)
    return Path(path)


def replace_dir(src, dst) -> Path:
    """Move the finished dir `src` to `dst`, replacing whatever `dst` held. The old one is renamed aside
    and deleted only after, so `dst` is never a half-deleted old dir or a half-written new one."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst
