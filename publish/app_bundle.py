"""`python -m publish app --to TARGET --model-repo URL`: publish the chat front end (a Gradio Space).

    python -m publish app --to hf:alice/lumi-chat --model-repo openxlab:alice/lumi
    python -m publish app --to git:https://github.com/alice/lumi-app.git --model-repo hf:alice/lumi

The bundle is what the Space needs to run, nothing else:
- `app.py` and every project module it imports, followed through the import graph (`inference/`
  and the `trainer/` modules the core uses), with their package data (templates, presets);
- `requirements.txt` (the project's pins, plus torch when they leave it out), `packages.txt`
  (git, git-lfs: the app clones the model repo);
- `README.md` with the Space front matter (`sdk: gradio`, `app_file: app.py`) and
  `space_config.json` holding the MODEL_REPO preset (the `MODEL_REPO` environment variable of the
  Space still wins). No token is ever written: a private model repo needs `MODEL_REPO_TOKEN` set as a
  Space secret.

Before anything is pushed (and in a dry run, when there is a change), the bundle is laid out in a
scratch dir and its modules are imported there by a fresh `python -I`, so a module the walk missed
fails here, not on the Space.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from publish.bundle import Bundle, materialize
from publish.deliver import deliver, report
from publish.model import add_common, repo_name
from publish.targets import parse_target
from inference.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
APP = "app.py"
SPACE_CONFIG = "space_config.json"


def _module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Absolute module names an import statement anywhere in the file may load (lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)   # `from pkg import submodule`
    return {n for n in names if n}


def local_modules(entry: Path, root: Path = ROOT) -> dict[str, Path]:
    """Project modules `entry` needs, transitively: {module name: file}."""
    found: dict[str, Path] = {}
    todo = [("", entry)]
    while todo:
        package, path = todo.pop()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name in _imported_names(tree, package):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):      # a, a.b, a.b.c: parents' __init__ run first
                mod = ".".join(parts[:i])
                file = _module_file(root, mod)
                if file is not None and mod not in found:
                    found[mod] = file
                    todo.append((mod if file.name == "__init__.py" else mod.rpartition(".")[0], file))
    return found


def package_data(modules: dict[str, Path], root: Path = ROOT) -> list[Path]:
    """Non-Python files inside the packages used (chat templates, presets), excluding caches."""
    dirs = {f.parent for f in modules.values() if f.parent != root}
    out = set()
    for d in dirs:
        for p in d.rglob("*"):
            rel = p.relative_to(d)
            if (p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in rel.parts
                    and not any(part.startswith(".") for part in rel.parts)
                    and not any((d / Path(*rel.parts[:i]) / "__init__.py").is_file()
                                for i in range(1, len(rel.parts)))):
                out.add(p)
    return sorted(out)


def model_repo_url(text: str) -> str:
    """MODEL_REPO as the app will clone it: schemes expanded, local paths absolute, no credentials."""
    if text.startswith(("openxlab:", "hf:", "git:")) or "://" in text or Path(text).expanduser().exists():
        target = parse_target(text, repo_type="model")
        return f"{target.endpoint}/{target.repo_id}" if target.scheme == "hf" else target.url
    if len(text.split("/")) == 2 and all(text.split("/")):
        return text                                 # a Hub id: the app resolves it
    raise UserError(f"--model-repo {text!r}: use a git URL, openxlab:USER/REPO, hf:USER/REPO or a local repo path")


# What serving needs (app.py + inference/): the rest of requirements.txt trains, plots or runs the
# Streamlit demo. bitsandbytes: the 4-bit fallback on a small GPU; sentencepiece: slow tokenizers; pillow
# comes with gradio.
SERVING = {"torch", "transformers", "tokenizers", "peft", "accelerate", "bitsandbytes", "safetensors",
           "sentencepiece", "huggingface_hub", "gradio", "gradio_client"}


def requirements(root: Path = ROOT) -> bytes:
    """The project's pins of the packages serving needs (comments kept), plus torch when they leave it out."""
    path = root / "requirements.txt"
    if not path.is_file():
        raise UserError(f"{path}: not found -- the Space needs the pinned requirements")
    lines = path.read_text(encoding="utf-8").splitlines()
    text = "".join(line + "\n" for line in lines
                   if "==" not in line or line.split("==")[0].strip().lower().replace("-", "_") in SERVING)
    pinned = {line.split("==")[0].strip().lower() for line in text.splitlines() if "==" in line}
    if "torch" not in pinned:
        from importlib.metadata import version

        text = text.rstrip("\n") + ("\n# torch: the version the app was tested with (a GPU Space may bring its own)\n"
                                    f"torch=={version('torch').split('+')[0]}\n")
    return text.encode("utf-8")


def space_readme(title: str, model_repo: str, req: bytes) -> bytes:
    gradio = next((line.split("==")[1].strip() for line in req.decode().splitlines()
                   if line.lower().startswith("gradio==")), None)
    meta = {"title": title, "emoji": "💬", "colorFrom": "indigo", "colorTo": "blue", "sdk": "gradio",
            **({"sdk_version": gradio} if gradio else {}), "python_version": "3.11", "app_file": APP,
            "pinned": False}
    body = [f"# {title}", "", "A chat app for a fine-tuned assistant, published with `python -m publish app`.", "",
            f"- model repo (`MODEL_REPO`, preset in `{SPACE_CONFIG}`): {model_repo}",
            "- override with the Space variables `MODEL_REPO` (a git URL or Hub id) or `MODEL_PATH` (a local dir);",
            "  a private model repo needs the secret `MODEL_REPO_TOKEN`.",
            "- the app clones the model with git-lfs (packages.txt), runs on GPU when there is one, else CPU.", ""]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    return ("---\n" + front + "\n---\n\n" + "\n".join(body)).encode("utf-8")


def app_bundle(model_repo: str, title: str, root: Path = ROOT) -> tuple[Bundle, list[str]]:
    entry = root / APP
    if not entry.is_file():
        raise UserError(f"{entry}: not found -- the front end to publish is the project's app.py")
    modules = local_modules(entry, root)
    bundle: Bundle = {APP: entry}
    for f in [*modules.values(), *package_data(modules, root)]:
        bundle[f.relative_to(root).as_posix()] = f
    req = requirements(root)
    bundle["requirements.txt"] = req
    packages = root / "packages.txt"
    bundle["packages.txt"] = packages if packages.is_file() else b"git\ngit-lfs\n"
    bundle["README.md"] = space_readme(title, model_repo, req)
    bundle[SPACE_CONFIG] = (json.dumps({"MODEL_REPO": model_repo}, indent=2) + "\n").encode("utf-8")
    return bundle, sorted(modules)


def check_imports(bundle: Bundle, modules: list[str], echo=print) -> None:
    """Lay the bundle out alone and import its modules with a fresh, isolated interpreter."""
    code = ("import importlib, sys; sys.path.insert(0, '.')\n"
            f"compile(open({APP!r}, encoding='utf-8').read(), {APP!r}, 'exec')\n"
            f"for m in {modules!r}: importlib.import_module(m)\n")
    with tempfile.TemporaryDirectory(prefix="publish-app-") as tmp:
        materialize(bundle, Path(tmp), link=True)
        out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp, capture_output=True, text=True)
    if out.returncode != 0:
        last = [ln for ln in out.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise UserError(f"the app bundle does not import on its own: {last[0]} -- a module app.py needs is "
                        "outside what publish found")
    echo(f"checked: app.py compiles and {len(modules)} project modules import from the bundle alone")


def publish_app(to: str, model_repo: str, message: str | None = None, private: bool = False,
                dry_run: bool = False, via: str = "auto", echo=print, root: Path = ROOT):
    target = parse_target(to, repo_type="space")
    url = model_repo_url(model_repo)
    bundle, modules = app_bundle(url, repo_name(target), root)
    result = deliver(bundle, target, message or "Publish chat app", private=private, dry_run=dry_run, via=via,
                     echo=echo, verify=lambda: check_imports(bundle, modules, echo))
    report(result, target, echo)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m publish app", description=__doc__.split("\n")[0])
    p.add_argument("--model-repo", required=True, metavar="URL",
                   help="where the app fetches the model: git URL, openxlab:USER/REPO, hf:USER/REPO or a path")
    add_common(p)
    args = p.parse_args(argv)
    publish_app(args.to, args.model_repo, args.message, args.private, args.dry_run, args.via,
                echo=lambda s: print(s, flush=True))
    return 0
