"""Fetch a model repo once: `git clone` + `git lfs pull` into a cache dir; later starts reuse it.

    python -m inference.fetch MODEL_REPO [--cache DIR]     # prints the local model dir

MODEL_REPO is any git remote: an OpenXLab repo (`https://code.openxlab.org.cn/USER/REPO.git`), a
Hugging Face repo URL or bare id (`USER/REPO` -> `https://huggingface.co/USER/REPO`), an ssh/file URL,
or a local repo path. The clone lands in `$OWN_ASSISTANT_CACHE/repos/<slug>` (default
`~/.cache/own-assistant`).

- A private repo's token comes from `MODEL_REPO_TOKEN` (or a `user:token@` part of the URL, which is
  stripped); the user name is the URL's user part, else the repo owner (OpenXLab wants the account
  name). git and git-lfs get it through a GIT_ASKPASS script that reads it from their
  environment: it never appears in a command line, the remote URL, `.git/config` or the log, and the
  credential helpers are switched off for these calls so none of them stores it.
- The clone skips LFS smudging (`GIT_LFS_SKIP_SMUDGE=1`), then `git lfs pull` downloads the weights
  with its progress in the log. A marker written last (`.git/own-assistant-fetched`) says the fetch
  completed; a later start finds it and touches no network. A start killed midway leaves no marker:
  the next one resumes (LFS objects already downloaded are kept) or, if the clone itself is
  unusable, removes it and clones again. A file lock keeps two starts from fetching at once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from inference.atomic import cache_root, locked
from inference.errors import UserError
from inference.repo_files import HUB_ID

log = logging.getLogger("own_assistant.fetch")

MARKER = "own-assistant-fetched"          # inside .git/: written last, so its presence means "complete"
HF_ENDPOINT = "https://huggingface.co"
ASKPASS = """#!/bin/sh
# Answers git's username/password prompts from the environment: the token is never in argv or a file.
case "$1" in
  Username*|username*) printf '%s\\n' "$OWN_ASSISTANT_GIT_USER" ;;
  *) printf '%s\\n' "$OWN_ASSISTANT_GIT_TOKEN" ;;
esac
"""


def repos_root() -> Path:
    return cache_root() / "repos"


def parse_source(spec: str) -> tuple[str, str | None, str | None]:
    """MODEL_REPO -> (clone URL without credentials, user, token from the URL or None)."""
    spec = spec.strip()
    if not spec:
        raise UserError("MODEL_REPO is empty -- set it to a git URL, a Hugging Face id (user/name) or a local repo")
    local = Path(spec).expanduser()
    if local.exists() or spec.startswith(("/", "./", "../", "~")):
        return str(local.resolve()), None, None
    if spec.startswith("git@") or "://" in spec:
        parts = urlsplit(spec)
        if parts.scheme not in ("http", "https"):
            return spec, None, None
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        path = parts.path.rstrip("/")
        if host == "huggingface.co":          # a browser URL of the repo page -> the repo itself
            path = re.sub(r"/(tree|blob|resolve)/.*$", "", path)
        owner = path.strip("/").split("/")[0] or None
        return urlunsplit((parts.scheme, netloc, path, "", "")), parts.username or owner, parts.password
    if HUB_ID.match(spec):
        return f"{HF_ENDPOINT}/{spec}", spec.split("/")[0], None
    raise UserError(f"MODEL_REPO {spec!r}: not a git URL, a Hugging Face id (user/name) or an existing local path")


def slug(url: str) -> str:
    """A readable, collision-free directory name for a URL."""
    owner_repo = [p for p in re.split(r"[/:]", url.removesuffix(".git")) if p][-2:]
    readable = re.sub(r"[^\w.-]+", "-", "-".join(owner_repo)).strip("-.")[-60:]
    return f"{readable}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def completed(target: Path, url: str) -> bool:
    marker = target / ".git" / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("url") == url
    except ValueError:
        return False


@contextmanager
def git_env(user: str | None, token: str | None):
    """Environment for git/git-lfs: never prompt on a terminal; the token only via GIT_ASKPASS."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
    if not token:
        yield env
        return
    tmp = Path(tempfile.mkdtemp(prefix="own-assistant-askpass-"))
    try:
        script = tmp / "askpass.sh"
        script.write_text(ASKPASS, encoding="utf-8")
        script.chmod(0o700)
        env.update(GIT_ASKPASS=str(script), OWN_ASSISTANT_GIT_USER=user or "git", OWN_ASSISTANT_GIT_TOKEN=token)
        yield env
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _git(args: list[str], env: dict, token: str | None, cwd=None, progress_file: Path | None = None) -> None:
    """Run git, logging its stderr lines (progress throttled) with the token masked; output on failure."""
    # An empty credential.helper resets the list: no configured helper stores the token we hand out.
    cmd = ["git", *(["-c", "credential.helper="] if token else []), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail: list[str] = []
    stop = threading.Event()
    mask = (lambda s: s.replace(token, "***")) if token else (lambda s: s)
    if progress_file is not None:
        threading.Thread(target=_log_lfs_progress, args=(progress_file, stop), daemon=True).start()
    last = 0.0
    buf = b""
    while chunk := proc.stderr.read1(4096):
        buf += chunk
        *lines, buf = re.split(rb"[\r\n]", buf)
        for raw in lines:
            line = mask(raw.decode("utf-8", "replace").strip())
            if not line:
                continue
            tail = (tail + [line])[-5:]
            is_progress = "%" in line and "done" not in line
            if not is_progress or time.monotonic() - last > 2:
                log.info("  %s", line)
                last = time.monotonic() if is_progress else last
    rc = proc.wait()
    stop.set()
    if buf.strip():
        tail.append(mask(buf.decode("utf-8", "replace").strip()))
    if rc != 0:
        raise subprocess.CalledProcessError(rc, args[0], stderr="\n".join(tail))


def _log_lfs_progress(path: Path, stop: threading.Event) -> None:
    """git-lfs writes `download 1/3 1048576/3600000000 model.safetensors` lines to GIT_LFS_PROGRESS."""
    shown = ""
    while not stop.wait(2):
        try:
            with path.open("rb") as f:          # a line per 32 KB received: read only the end
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        if lines and lines[-1] != shown:
            shown = lines[-1]
            parts = shown.split()
            sizes = parts[2].split("/") if len(parts) >= 4 else []
            if len(sizes) == 2 and all(x.isdigit() for x in sizes):
                done, total = int(sizes[0]), int(sizes[1])
                log.info("  lfs %s %s: %s %.0f%% of %.1f MB", parts[0], parts[1], " ".join(parts[3:]),
                         100 * done / max(total, 1), total / 1e6)


def _reason(exc: subprocess.CalledProcessError) -> str:
    lines = [s for s in (exc.stderr or "").splitlines() if s.strip()]
    return lines[-1] if lines else f"exit code {exc.returncode}"


def _hint(url: str, token: str | None) -> str:
    if Path(url).is_dir() and (Path(url) / "config.json").is_file():
        return " -- this is a plain model dir, not a git repo: set MODEL_PATH to it instead"
    if url.startswith(("http://", "https://")) and not token:
        return " -- check the URL; a private repo also needs MODEL_REPO_TOKEN"
    return ""


def _usable_clone(target: Path, url: str, env: dict) -> bool:
    """A half-finished fetch worth resuming: a real checkout of this URL with a commit checked out."""
    def ok(*args):
        r = subprocess.run(["git", "-C", str(target), *args], env=env, capture_output=True, text=True)
        return r.returncode == 0, r.stdout.strip()
    return ((target / ".git").is_dir() and ok("rev-parse", "--verify", "-q", "HEAD")[0]
            and ok("config", "--get", "remote.origin.url") == (True, url))


def check_tools() -> None:
    for tool, args in (("git", ["git", "--version"]), ("git-lfs", ["git", "lfs", "version"])):
        try:
            subprocess.run(args, capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            raise UserError(f"{tool} is not installed -- install git and git-lfs (packages.txt lists them "
                            "for a Space; `apt-get install git git-lfs` elsewhere)") from None


def fetch(spec: str, token: str | None = None, cache_dir=None) -> Path:
    """Clone + LFS-pull MODEL_REPO into the cache (once) and return the local dir."""
    url, user, url_token = parse_source(spec)
    token = token or url_token
    root = Path(cache_dir) if cache_dir else repos_root()
    target = root / slug(url)
    if not completed(target, url) and url.startswith("/") and not Path(url).exists():
        raise UserError(f"MODEL_REPO {url}: no such directory -- give a git URL, a Hugging Face id or an "
                        "existing repo path")
    with locked(root / f"{target.name}.lock"):
        if completed(target, url):
            log.info("model repo %s: using the clone in %s (delete it to fetch again)", url, target)
            return target
        check_tools()
        with git_env(user, token) as env:
            if target.exists() and _usable_clone(target, url, env):
                log.info("model repo %s: resuming an interrupted fetch in %s", url, target)
                (target / ".git" / "index.lock").unlink(missing_ok=True)    # left by a killed git
                _run_step(["reset", "-q", "--hard", "HEAD"], env, token, url, target)  # restore a cut checkout
            else:
                if target.exists():
                    log.info("model repo %s: removing an unusable half-finished clone in %s", url, target)
                    shutil.rmtree(target)
                log.info("model repo %s: git clone into %s", url, target)
                try:
                    _git(["clone", "--progress", url, str(target)], env, token)
                except subprocess.CalledProcessError as exc:
                    shutil.rmtree(target, ignore_errors=True)
                    raise UserError(f"MODEL_REPO {url}: git clone failed: {_reason(exc)}{_hint(url, token)}") from None
            # Without git-lfs hooks installed for this repo (a fresh HOME, no global `git lfs install`),
            # `git lfs pull` downloads the objects but skips the checkout: the weights stay pointer stubs.
            _run_step(["lfs", "install", "--local"], env, token, url, target)
            log.info("model repo %s: git lfs pull (downloading the weights)", url)
            progress = target / ".git" / "lfs-progress.log"
            progress.unlink(missing_ok=True)
            _run_step(["lfs", "pull"], {**env, "GIT_LFS_PROGRESS": str(progress)}, token, url, target, progress)
            progress.unlink(missing_ok=True)
        commit = subprocess.run(["git", "-C", str(target), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        marker = target / ".git" / MARKER
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": url, "commit": commit}) + "\n", encoding="utf-8")
        os.replace(tmp, marker)
        log.info("model repo %s: fetched commit %s into %s", url, commit[:12], target)
    return target


def _run_step(args, env, token, url, target: Path, progress: Path | None = None) -> None:
    try:
        _git(args, env, token, cwd=target, progress_file=progress)
    except subprocess.CalledProcessError as exc:
        # Keep the clone: the next start resumes; LFS objects already downloaded are not fetched again.
        hint = (" -- the weights are missing from the remote's LFS storage (push them with `git lfs push --all "
                "origin`) or the token lacks access; the next start resumes" if args[0] == "lfs" else "")
        raise UserError(f"MODEL_REPO {url}: git {' '.join(args)} failed: {_reason(exc)}{hint}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.fetch", description=__doc__.split("\n")[0])
    p.add_argument("model_repo", help="git URL, Hugging Face id or local repo path")
    p.add_argument("--cache", help="cache dir (default: $OWN_ASSISTANT_CACHE/repos or ~/.cache/own-assistant/repos)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(fetch(args.model_repo, token=os.environ.get("MODEL_REPO_TOKEN") or None, cache_dir=args.cache))
    return 0


if __name__ == "__main__":
    from inference.errors import run_cli

    raise SystemExit(run_cli(main))
