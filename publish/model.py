"""`python -m publish model MODEL_DIR --to TARGET`: push a merged model dir to OpenXLab, the Hub or git.

    python -m publish model merged/ --to openxlab:alice/lumi          # OPENXLAB_USER + OPENXLAB_TOKEN
    python -m publish model merged/ --to hf:alice/lumi [--private]    # HF_TOKEN (Hub API; --via git)
    python -m publish model merged/ --to git:/srv/git/lumi.git --dry-run
    python -m publish model merged/ --to hf:alice/lumi --gguf q8_0    # + lumi-q8_0.gguf, Ollama Modelfile

The dir is validated first (config, weights, tokenizer, chat template, no LFS pointer stubs), a
model card README.md is added unless the dir has one, and the repo is made to mirror the dir:
weights go through git-lfs, re-publishing an unchanged dir makes no commit, a changed dir makes
exactly one. Hidden files (a stray `.env`) are never published and a symlink out of the dir is
refused (publish/validate.py). `--dry-run` lists the files that would change and writes nothing
remote. The pushed `assistant.json` leaves out the local paths it recorded (the dir's own copy is
not touched).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path, PurePosixPath

from inference.assistant_file import ASSISTANT_FILE, PATH_KEYS
from publish.bundle import Bundle
from inference.repo_files import HUB_ID
from publish.card import model_card
from publish.deliver import deliver, report
from publish.gguf import gguf_bundle
from publish.targets import parse_target
from publish.validate import left_out, validate_model_dir
from inference.errors import UserError


def repo_name(target) -> str:
    last = (target.repo_id or target.url).rstrip("/").replace(":", "/").split("/")[-1]
    return last.removesuffix(".git") or "model"


def _public_ref(value, model_dir: Path) -> bool:
    """Whether a recorded source means the same thing on anyone's machine: a hub id, or a path inside
    the published dir (`./rel`). Anything else (/abs, ~/rel, ../x) is this machine's business."""
    if not isinstance(value, str):
        return True                                        # null: nothing to leak
    if value == "." or value.startswith("./"):
        return ".." not in PurePosixPath(value).parts
    return bool(HUB_ID.match(value)) and not (model_dir / value).exists() and not Path(value).exists()


def public_assistant_file(model_dir: Path) -> Path | bytes:
    """The assistant.json to publish: the local file itself when it names no local path, else bytes with
    those keys left out. Left out, not cut to a last part: a bare `final` or `tiny-base` would read as a
    hub id or a relative path to whatever loads it, and the card already names the base model."""
    path = model_dir / ASSISTANT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}) -- fix it or delete it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object -- fix it or delete it")
    local = [k for k in PATH_KEYS if k in data and not _public_ref(data[k], model_dir)]
    if not local:
        return path
    public = {k: v for k, v in data.items() if k not in local}
    return (json.dumps(public, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def model_bundle(model_dir: Path, target, extra: Bundle | None = None) -> Bundle:
    files = validate_model_dir(model_dir)
    bundle: Bundle = {f.as_posix(): model_dir / f for f in files}
    bundle.update(extra or {})                      # generated files (--gguf), listed in the card too
    if ASSISTANT_FILE in bundle:
        bundle[ASSISTANT_FILE] = public_assistant_file(model_dir)
    if "README.md" not in bundle:
        clone = target.web_url if target.scheme == "hf" else target.url
        bundle["README.md"] = model_card(model_dir, repo_name(target), clone, sorted(bundle)).encode("utf-8")
    return bundle


def publish_model(model_dir, to: str, message: str | None = None, private: bool = False, dry_run: bool = False,
                  via: str = "auto", gguf: str | None = None, echo=print):
    if not gguf:
        return _publish(model_dir, to, message, private, dry_run, via, None, echo)
    validate_model_dir(Path(model_dir))             # a broken dir fails before the export, not after it
    with tempfile.TemporaryDirectory(prefix="publish-gguf-") as tmp:
        extra = gguf_bundle(model_dir, gguf, repo_name(parse_target(to, repo_type="model")), Path(tmp), echo=echo)
        return _publish(model_dir, to, message, private, dry_run, via, extra, echo)


def _publish(model_dir, to, message, private, dry_run, via, extra, echo):
    model_dir = Path(model_dir)
    target = parse_target(to, repo_type="model")
    bundle = model_bundle(model_dir, target, extra)
    if skipped := left_out(model_dir):
        echo(f"not published (hidden files and dirs never are): {', '.join(skipped)}")
    result = deliver(bundle, target, message or f"Publish model {model_dir.resolve().name}", private=private,
                     dry_run=dry_run, via=via, echo=echo)
    report(result, target, echo)
    return result


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, metavar="TARGET", help="openxlab:USER/REPO, hf:USER/REPO or git:URL_OR_PATH")
    p.add_argument("--message", "-m", help="commit message")
    p.add_argument("--private", action="store_true", help="create the Hub repo private (hf: only)")
    p.add_argument("--dry-run", action="store_true", help="show what would change; write nothing remote")
    p.add_argument("--via", default="auto", choices=["auto", "api", "git"],
                   help="hf: route: api (default, huggingface_hub) or git (git-lfs push)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m publish model", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="a merged model dir (python -m trainer merge ...)")
    add_common(p)
    p.add_argument("--gguf", metavar="QUANT", help="also push a GGUF (f16, bf16, q8_0 or q4_0) and an Ollama "
                                                   "Modelfile (python -m trainer export-gguf)")
    args = p.parse_args(argv)
    publish_model(args.model_dir, args.to, args.message, args.private, args.dry_run, args.via, args.gguf,
                  echo=lambda s: print(s, flush=True))
    return 0
