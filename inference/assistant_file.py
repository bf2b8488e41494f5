"""`assistant.json`: what a model dir says about its own training -- the system prompt it was trained
with (chat and the apps use it as the default) and where it came from (base model, adapter, checkpoint).

It ships with the weights (a hub repo, a Space), so recorded local paths are stored portably: inside
the model dir as `./rel`, under the home dir as `~/rel` (no user name), hub ids as they are.
`read_assistant_file` turns them back into paths that work on this machine. No torch here: the
publish tools read it too.
"""
from __future__ import annotations

import json
from pathlib import Path

ASSISTANT_FILE = "assistant.json"
# the keys that hold local paths (written by train, convert, merge, mm-train, mm-export)
PATH_KEYS = ("base_model", "adapter", "source_checkpoint", "trained_from")


def portable_path(value, model_dir) -> str:
    """How a local path is stored in assistant.json, which ships with the model (a hub repo, a Space):
    inside the model dir -> `./rel` (true wherever the dir goes); under the home dir -> `~/rel` (no user
    name); any other existing/absolute path as is; anything else (a hub id like `Qwen/Qwen2-0.5B`) as is."""
    text = str(value)
    path = Path(text).expanduser()
    if not (path.is_absolute() or path.exists()):
        return text
    path, model_dir, home = path.resolve(), Path(model_dir).resolve(), Path.home().resolve()
    if path.is_relative_to(model_dir):
        return "./" + path.relative_to(model_dir).as_posix() if path != model_dir else "."
    if path.is_relative_to(home) and home != Path(home.anchor):
        return "~/" + path.relative_to(home).as_posix()
    return str(path)


def local_path(stored: str, model_dir) -> str:
    """The inverse of `portable_path` on this machine: `./rel` against the model dir, `~` expanded."""
    if stored == "." or stored.startswith(("./", "../")):
        return str(Path(model_dir).resolve() / stored)
    return str(Path(stored).expanduser()) if stored.startswith("~") else stored


def read_assistant_file(model_dir) -> dict:
    """assistant.json of `model_dir` ({} when missing), its recorded paths made usable on this machine."""
    file = Path(model_dir) / ASSISTANT_FILE
    if not file.is_file():
        return {}
    return local_paths(json.loads(file.read_text(encoding="utf-8")), model_dir)


def local_paths(data: dict, model_dir) -> dict:
    """assistant.json content with the PATH_KEYS values made usable on this machine (`local_path`)."""
    return {k: local_path(v, model_dir) if k in PATH_KEYS and isinstance(v, str) else v for k, v in data.items()}


def read_system_prompt(*dirs) -> str | None:
    for d in dirs:
        if d and (Path(d) / ASSISTANT_FILE).is_file():
            return read_assistant_file(d).get("system_prompt")
    return None


def write_assistant_file(out_dir, system_prompt: str | None, **extra) -> None:
    """`{"system_prompt": ..., **extra}`; the values of PATH_KEYS are stored portably (`portable_path`)."""
    extra = {k: portable_path(v, out_dir) if k in PATH_KEYS and v is not None else v for k, v in extra.items()}
    data = {"system_prompt": system_prompt, **extra}
    (Path(out_dir) / ASSISTANT_FILE).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def manifest_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".manifest.json")
