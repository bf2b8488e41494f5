"""`python -m publish model MODEL_DIR --to TARGET`: push a merged model dir to OpenXLab, the Hub or git.

    python -m publish model merged/ --to openxlab:alice/lumi          # OPENXLAB_USER + OPENXLAB_TOKEN
    python -m publish model merged/ --to hf:alice/lumi [--private]    # HF_TOKEN (Hub API; --via git)
    python -m publish model merged/ --to git:/srv/git/lumi.git --dry-run

The dir is validated first (config, weights, tokenizer, chat template, no LFS pointer stubs), a
model card README.md is added unless the dir has one, and the repo is made to mirror the dir:
weights go through git-lfs, re-publishing an unchanged dir makes no commit, a changed dir makes
exactly one. `--dry-run` lists what would change and writes nothing remote.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from publish.bundle import Bundle
from publish.card import model_card
from publish.deliver import deliver, report
from publish.targets import parse_target
from publish.validate import validate_model_dir


def repo_name(target) -> str:
    last = (target.repo_id or target.url).rstrip("/").replace(":", "/").split("/")[-1]
    return last.removesuffix(".git") or "model"


def model_bundle(model_dir: Path, target) -> Bundle:
    files = validate_model_dir(model_dir)
    bundle: Bundle = {f.as_posix(): model_dir / f for f in files}
    if "README.md" not in bundle:
        clone = target.web_url if target.scheme == "hf" else target.url
        bundle["README.md"] = model_card(model_dir, repo_name(target), clone, sorted(bundle)).encode("utf-8")
    return bundle


def publish_model(model_dir, to: str, message: str | None = None, private: bool = False, dry_run: bool = False,
                  via: str = "auto", echo=print):
    model_dir = Path(model_dir)
    target = parse_target(to, repo_type="model")
    bundle = model_bundle(model_dir, target)
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
    args = p.parse_args(argv)
    publish_model(args.model_dir, args.to, args.message, args.private, args.dry_run, args.via,
                  echo=lambda s: print(s, flush=True))
    return 0
