"""Write files and directories so that a crash or an error never leaves one half-written.

    with new_dir(out) as tmp:          # fill tmp; on success it becomes `out`, on error it is removed
        model.save_pretrained(tmp)
    with new_dir(out, replace=True) as tmp:     # the same, swapping out an older `out`
        model.save_pretrained(tmp)
    with new_file(path) as f:          # a text file written beside `path` and renamed over it
        f.write(text)
    replace_dir(finished, dst)         # move a finished dir over an older one
    usual_modes(path)                  # umask permissions for a tree a library wrote in place
    with locked(lock_file):            # one process at a time builds a shared cache entry

Everything is written next to its destination (same filesystem), so the final `os.replace` is a rename.
What is put in place gets the permissions a plain write would give (0o666 / 0o777 minus the umask),
whatever the library that wrote it did.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from inference.errors import UserError


def cache_root() -> Path:
    """Where built and fetched things are kept between runs: $OWN_ASSISTANT_CACHE, else
    ~/.cache/own-assistant (embedded bases, cloned model repos, self-distilled answers)."""
    return Path(os.environ.get("OWN_ASSISTANT_CACHE", Path.home() / ".cache" / "own-assistant"))


def _beside(path: Path) -> Path:
    # not tempfile.mkstemp/mkdtemp: those create 0600/0700, and a model dir or data file written here
    # should get the usual permissions (umask), like one written directly
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _umask() -> int:
    # os.umask can only be read by setting it, which races with other threads creating files: read it
    # from /proc where there is one (the fallback sets a strict mask meanwhile, so a racer is only private)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def usual_modes(root) -> None:
    """Give `root` and everything under it the mode a plain `open`/`mkdir` would have: safetensors 0.8
    (and tempfile) write through private 0600/0700 temp files, which would make a saved model unreadable
    to anyone else (a shared server, a web server serving the dir). Owner-executable files stay so."""
    root, mask = Path(root), _umask()

    def fix(path: str) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return                        # a link's target is not ours to change
        want = (0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR else 0o666) & ~mask
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(path, want)

    fix(str(root))
    if root.is_dir() and not root.is_symlink():
        for parent, dirs, files in os.walk(root):
            for name in dirs + files:
                fix(os.path.join(parent, name))


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
    usual_modes(src)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


@contextmanager
def locked(path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on PATH, held for the block: two processes filling the same
    cache entry (two first starts of the app, N training workers) take turns instead of racing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
