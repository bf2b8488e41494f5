"""A bundle: the exact set of files a repo should hold after publishing, path in repo -> content.

Content is a local file (copied when materialized) or bytes (generated: model card, Space README).
Both publish routes (git and the Hub API) take a bundle, so they publish the same thing.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path, PurePosixPath

# Stored through git-lfs whatever their size; anything >= LARGE_BYTES too.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.model", "*.pth", "*.pt", "*.gguf", "*.ckpt", "*.onnx")
LARGE_BYTES = 5 * 1024 * 1024

Bundle = dict  # str (posix path in repo) -> Path | bytes


def size_of(content) -> int:
    return len(content) if isinstance(content, bytes) else Path(content).stat().st_size


def wants_lfs(path: str, size: int) -> bool:
    name = PurePosixPath(path).name
    return size >= LARGE_BYTES or any(fnmatch.fnmatch(name, pat) for pat in LFS_PATTERNS)


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def materialize(bundle: Bundle, dest: Path, link: bool = False) -> None:
    """Write the bundle under `dest`. `link=True` hard-links files where the filesystem allows
    (a staging dir for an upload that only reads them), else copies."""
    for rel, content in sorted(bundle.items()):
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            out.write_bytes(content)
            continue
        if link:
            try:
                os.link(content, out)
                continue
            except OSError:
                pass
        shutil.copyfile(content, out)


def describe(bundle: Bundle, rel: str) -> str:
    """`path (8.0 MB, LFS)` for change lists."""
    if rel not in bundle:
        return rel
    size = size_of(bundle[rel])
    return f"{rel} ({human(size)}{', LFS' if wants_lfs(rel, size) else ''})"
