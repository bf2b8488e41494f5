"""The README stays true: its file tree lists exactly the files in the repository (one line each), and
its first lines give the two set-up commands that CI and a new user run."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_tree() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Files", 1)[1].split("```", 2)[1]
    return {line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith("#")}


def test_file_tree_lists_every_tracked_file_and_nothing_else():
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    tracked |= set(subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.split())
    listed = readme_tree()
    assert sorted(tracked - listed) == [], "add these to the README's file tree"
    assert sorted(listed - tracked) == [], "the README's file tree names files that do not exist"


def test_the_first_commands_are_the_two_jobs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "bash run.sh demo" in first and "bash run.sh test" in first
