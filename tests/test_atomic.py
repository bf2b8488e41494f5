"""inference/atomic.py: outputs appear whole or not at all, and nothing is left beside them."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from inference.atomic import new_dir, new_file, replace_dir
from inference.errors import UserError


def test_new_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with new_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []
    with new_dir(out) as tmp:
        assert not out.exists()                     # nothing at the destination while it is written
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "config.json").read_text() == "{}"
    with pytest.raises(UserError, match="already exists and is not empty"):
        with new_dir(out):
            pass
    with new_dir(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_new_file_keeps_the_old_content_on_error(tmp_path):
    path = tmp_path / "sub" / "data.jsonl"
    with new_file(path) as f:
        f.write("一\n")
    with pytest.raises(ValueError):
        with new_file(path) as f:
            f.write("half")
            raise ValueError
    assert path.read_text(encoding="utf-8") == "一\n" and [p.name for p in path.parent.iterdir()] == ["data.jsonl"]
    direct = tmp_path / "direct.txt"
    direct.write_text("")
    assert path.stat().st_mode == direct.stat().st_mode     # umask permissions, not mkstemp's private 0600


def test_replace_dir_swaps_a_finished_dir_in(tmp_path):
    old, new = tmp_path / "final", tmp_path / ".final.tmp"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    replace_dir(new, old)
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and [p.name for p in old.iterdir()] == ["b"]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_what_is_put_in_place_gets_umask_permissions(tmp_path, umask_022):
    # safetensors writes through a private 0600 temp file: the saved model must still be readable by others
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "model"
    with new_dir(out) as tmp:
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
        Path(tempfile.mkdtemp(dir=tmp)).rename(tmp / "sub")          # a 0700 dir inside
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "sub").stat().st_mode) == stat.S_IMODE(out.stat().st_mode) == 0o755
    finished = Path(tempfile.mkdtemp(dir=tmp_path))                   # replace_dir of a mkdtemp dir
    (finished / "run.sh").write_text("")
    os.chmod(finished / "run.sh", 0o700)
    replace_dir(finished, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) == 0o755     # executable stays executable
    os.umask(0o077)                                                   # a private umask is honoured too
    with new_dir(tmp_path / "private") as tmp:
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
    assert stat.S_IMODE((tmp_path / "private" / "model.safetensors").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700


def test_tiny_base_files_are_readable_by_others(tmp_path, umask_022):
    from trainer.bases.tiny import build_tiny

    out = build_tiny(tmp_path / "tiny", steps=0, echo=lambda s: None)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
