"""trainer/atomic.py: outputs appear whole or not at all, and nothing is left beside them."""
from __future__ import annotations

import pytest

from trainer.atomic import new_dir, new_file, replace_dir
from trainer.errors import UserError


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
