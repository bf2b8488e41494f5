"""Check a model dir is complete before anything is pushed: every problem listed at once.

A publishable chat model has `config.json`, weights (`*.safetensors` or `*.bin`, every shard an
index names), a tokenizer (`tokenizer.json`, `tokenizer.model`, or vocab files) with
`tokenizer_config.json`, and a chat template (`chat_template.jinja`/`.json` or inside
`tokenizer_config.json`). No file may be a git-lfs pointer stub standing in for the real thing:
the classic "uploaded 130-byte weights" mistake.

Only what a model needs is published: hidden files and dirs (a stray `.env`, `.git/`, `.cache/`) and
`__pycache__` are left out, and a symlink that leads out of the dir (a link to `~/.ssh`) stops the
run with one line: its target would otherwise be uploaded.

    from publish.validate import validate_model_dir
    validate_model_dir("merged/")          # raises UserError listing everything missing
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from inference.errors import UserError
from inference.repo_files import is_lfs_pointer

SKIP_NAMES = {"__pycache__"}       # besides every hidden name (starting with ".")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def is_left_out(name: str) -> bool:
    return name.startswith(".") or name in SKIP_NAMES


def left_out(model_dir: Path) -> list[str]:
    """The top-level names never published (`.env`, `.git/`): for the note that says so."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in Path(model_dir).iterdir() if is_left_out(p.name))


def _refuse_escaping_link(model_dir: Path, path: Path) -> None:
    root = model_dir.resolve()
    if not path.resolve().is_relative_to(root):
        raise UserError(f"{path}: a symlink to {path.resolve()}, outside {model_dir} -- refusing to publish it "
                        "(copy the file into the dir or remove the link)")


def model_files(model_dir: Path) -> list[Path]:
    """Every file that would be published, relative to `model_dir`, sorted. Hidden names are skipped; a
    symlink leaving the dir raises UserError; symlinked dirs are not followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(model_dir):          # never follows directory links
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not is_left_out(d)]
        for name in dirnames + filenames:
            if not is_left_out(name) and (here / name).is_symlink():
                _refuse_escaping_link(model_dir, here / name)
        out += [(here / f).relative_to(model_dir) for f in filenames
                if not is_left_out(f) and (here / f).is_file()]
    return sorted(out)


def _json(path: Path, problems: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name} is not valid JSON ({exc.__class__.__name__})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return data


def _check_weights(d: Path, files: list[Path], problems: list[str]) -> None:
    weights = [f for f in files if f.suffix in (".safetensors", ".bin") and f.parent == Path(".")
               and f.name != "training_args.bin"]
    if not weights:
        problems.append("no weights (*.safetensors or *.bin)")
    for index in [f for f in files if f.name.endswith(".index.json")]:
        data = _json(d / index, problems) or {}
        shards = sorted(set((data.get("weight_map") or {}).values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            problems.append(f"{index} names missing shards: {', '.join(missing[:3])}"
                            + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    for w in weights:
        if (d / w).stat().st_size == 0:
            problems.append(f"{w} is empty")


def _check_tokenizer(d: Path, problems: list[str]) -> None:
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        problems.append("no tokenizer (tokenizer.json or tokenizer.model)")
    tok_config = d / "tokenizer_config.json"
    if not tok_config.is_file():
        problems.append("no tokenizer_config.json")
    has_template = (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file()
    if not has_template and tok_config.is_file():
        has_template = bool((_json(tok_config, problems) or {}).get("chat_template"))
    if not has_template:
        problems.append("no chat template (chat_template.jinja or tokenizer_config.json 'chat_template') "
                        "-- save the tokenizer of a chat model with the model")


def validate_model_dir(model_dir) -> list[Path]:
    """Raise UserError naming every problem; return the files to publish (relative paths)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: model directory not found")
    files = model_files(d)
    pointers = [str(f) for f in files if is_lfs_pointer(d / f)]
    problems: list[str] = []
    if pointers:
        problems.append(f"git-lfs pointer files instead of the real content: {', '.join(pointers[:5])}"
                        + (f" (+{len(pointers) - 5} more)" if len(pointers) > 5 else "")
                        + f" -- run `git lfs pull` in {d}")
    if not (d / "config.json").is_file():
        adapter = (d / "adapter_config.json").is_file()
        problems.append("no config.json" + (" (this is a LoRA adapter: merge it first with "
                                             "`python -m trainer merge BASE ADAPTER OUT`)" if adapter else ""))
    elif "config.json" not in pointers:
        _json(d / "config.json", problems)
    _check_weights(d, files, problems)
    _check_tokenizer(d, problems)
    if problems:
        raise UserError(f"{d}: not ready to publish: " + "; ".join(problems))
    return files
