"""What a model repo looks like from outside: git-lfs pointer stubs (a clone whose large files were never
pulled) and Hugging Face repo ids (`user/name`). One definition, used by fetch, loading and publishing.
No torch here: the publish tools import it.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_lfs_pointer(path) -> bool:
    """A small file that starts like a git-lfs pointer: the real content was never pulled."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size >= 1024:
        return False
    with path.open("rb") as f:
        return f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def lfs_pointers(folder) -> list[Path]:
    """The files directly in FOLDER that are still git-lfs pointer stubs."""
    return [p for p in Path(folder).iterdir() if is_lfs_pointer(p)]


def files_sha256(files) -> str:
    """One sha256 over the bytes of FILES, in the order given, read in 16 MiB chunks (never a whole
    multi-GB weight file in memory): names a model's or an adapter's weights by content."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
