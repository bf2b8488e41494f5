"""Fetch a model repo once into a cache dir; later starts reuse it and update it when the remote moved.

    python -m inference.fetch MODEL_REPO [--cache DIR]     # prints the local model dir

MODEL_REPO is an OpenXLab repo or any git remote (`https://code.openxlab.org.cn/USER/REPO.git`, an
ssh/file URL, a local repo path): `git clone` + `git lfs pull`; or a Hugging Face id or page URL
(`USER/REPO`, `https://huggingface.co/USER/REPO`): `huggingface_hub.snapshot_download`
(inference/hub_download.py; `HF_ENDPOINT` points it elsewhere). A `.git` URL on the Hub stays git.
The copy lands in `$OWN_ASSISTANT_CACHE/repos/<slug>` (default `~/.cache/own-assistant`).

- A private repo's token comes from `MODEL_REPO_TOKEN` (or a `user:token@` part of the URL, which is
  stripped); the user name is the URL's user part, else the repo owner (OpenXLab wants the account
  name). It is refused over plain `http://` except to localhost. git and git-lfs get it through the
  one credential helper of inference/credentials.py, which answers only for the repo URL's host: an
  LFS endpoint on another host (a repo's `.lfsconfig`) gets nothing. It never appears in a command
  line, the remote URL, `.git/config` or the log. Every URL follows `--` on git's command line.
- The clone skips LFS smudging (`GIT_LFS_SKIP_SMUDGE=1`), then `git lfs pull` downloads the weights
  with its progress in the log. A marker written last (`.git/own-assistant-fetched`) says the fetch
  completed. A start killed midway leaves no marker: the next one resumes (LFS objects already
  downloaded are kept) or, if the clone itself is unusable, removes it and clones again. A file lock
  keeps two starts from fetching at once.
- A later start asks the remote for its HEAD (`git ls-remote`, one round trip, no download) and, when
  it moved, fetches the new commit and its LFS files into the same clone: a Space with a persistent
  cache serves a newly published model after a restart. An unreachable remote keeps the cached copy.
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
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from inference.atomic import cache_root, locked
from inference.credentials import check_transport, git_credentials, mask, secret_forms
from inference.errors import UserError
from inference.repo_files import HUB_ID

log = logging.getLogger("own_assistant.fetch")

MARKER = "own-assistant-fetched"          # inside .git/ (.cache/ for a Hub download): written last = complete
HF_ENDPOINT = "https://huggingface.co"


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def repos_root() -> Path:
    return cache_root() / "repos"


def parse_source(spec: str) -> tuple[str, str | None, str | None]:
    """MODEL_REPO -> (clone URL without credentials, user, token from the URL or None)."""
    spec = spec.strip()
    if not spec:
        raise UserError("MODEL_REPO is empty -- set it to a git URL, a Hugging Face id (user/name) or a local repo")
    if spec.startswith("-"):            # git would read it as an option (`--upload-pack=...` runs a command)
        raise UserError(f"MODEL_REPO {spec.split()[0]!r}: starts with '-' -- give a git URL, a Hugging Face id "
                        "or a local repo path")
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
        if f"{parts.scheme}://{netloc}" in (HF_ENDPOINT, hf_endpoint()):   # a repo page URL -> the repo itself
            path = re.sub(r"/(tree|blob|resolve)/.*$", "", path)
        owner = path.strip("/").split("/")[0] or None
        return urlunsplit((parts.scheme, netloc, path, "", "")), parts.username or owner, parts.password
    if HUB_ID.match(spec):
        return f"{hf_endpoint()}/{spec}", spec.split("/")[0], None
    raise UserError(f"MODEL_REPO {spec!r}: not a git URL, a Hugging Face id (user/name) or an existing local path")


def hub_repo(url: str) -> tuple[str, str] | None:
    """(endpoint, USER/REPO) when `url` names a Hugging Face model repo (not a `.git` URL), else None."""
    for endpoint in {HF_ENDPOINT, hf_endpoint()}:
        rest = url.removeprefix(endpoint + "/") if url.startswith(endpoint + "/") else None
        if rest and HUB_ID.match(rest) and not rest.endswith(".git") and rest.split("/")[0] not in (
                "spaces", "datasets"):
            return endpoint, rest
    return None


def slug(url: str) -> str:
    """A readable, collision-free directory name for a URL."""
    owner_repo = [p for p in re.split(r"[/:]", url.removesuffix(".git")) if p][-2:]
    readable = re.sub(r"[^\w.-]+", "-", "-".join(owner_repo)).strip("-.")[-60:]
    return f"{readable}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def marker_path(target: Path) -> Path:
    return target / (".git" if (target / ".git").is_dir() else ".cache") / MARKER


def completed(target: Path, url: str) -> str | None:
    """The commit a finished fetch of `url` left in `target` ("" when unknown), or None: not finished."""
    marker = marker_path(target)
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return (data.get("commit") or "") if data.get("url") == url else None


def write_marker(target: Path, url: str, commit: str) -> None:
    marker = marker_path(target)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "commit": commit}) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def _git(args: list[str], env: dict, forms: list[str], cwd=None, progress_file: Path | None = None) -> None:
    """Run git, logging its stderr lines (progress throttled) with the token masked; output on failure."""
    proc = subprocess.Popen(["git", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail: list[str] = []
    stop = threading.Event()
    if progress_file is not None:
        threading.Thread(target=_log_lfs_progress, args=(progress_file, stop), daemon=True).start()
    last = 0.0
    buf = b""
    while chunk := proc.stderr.read1(4096):
        buf += chunk
        *lines, buf = re.split(rb"[\r\n]", buf)
        for raw in lines:
            line = mask(raw.decode("utf-8", "replace").strip(), forms)
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
        tail.append(mask(buf.decode("utf-8", "replace").strip(), forms))
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


def remote_head(url: str, env: dict) -> str | None:
    """The commit the remote's HEAD points at (`git ls-remote`: one round trip), or None when unknown."""
    try:
        out = subprocess.run(["git", "ls-remote", "--", url, "HEAD"], env=env, capture_output=True, text=True,
                             timeout=60)
    except (subprocess.TimeoutExpired, OSError):        # no git at all: the cached clone still serves
        return None
    sha = out.stdout.split("\t")[0].strip() if out.returncode == 0 else ""
    return sha or None


def fetch(spec: str, token: str | None = None, cache_dir=None) -> Path:
    """Clone + LFS-pull MODEL_REPO into the cache (once; again when the remote moved) and return the local dir."""
    url, user, url_token = parse_source(spec)
    token = token or url_token
    check_transport(url, token, "MODEL_REPO")
    root = Path(cache_dir) if cache_dir else repos_root()
    target = root / slug(url)
    hub = hub_repo(url)
    if completed(target, url) is None and url.startswith("/") and not Path(url).exists():
        raise UserError(f"MODEL_REPO {url}: no such directory -- give a git URL, a Hugging Face id or an "
                        "existing repo path")
    with locked(root / f"{target.name}.lock"):
        if hub:
            from inference.hub_download import hub_commit, hub_snapshot

            have = completed(target, url)
            commit = hub_commit(hub[1], hub[0], token, target, have)
            if commit == have:
                log.info("model repo %s: using the copy in %s (commit %s)", url, target, commit[:12])
                return target
            marker_path(target).unlink(missing_ok=True)   # not complete again until the new commit is all there
            hub_snapshot(hub[1], hub[0], token, target, commit)
            write_marker(target, url, commit)
            return target
        with git_credentials(url, user, token) as extra:
            env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1", **extra}
            forms = secret_forms(user, token)
            have = completed(target, url)
            if have is not None:
                head = remote_head(url, env)
                if head is None or head == have:
                    log.info("model repo %s: using the clone in %s%s", url, target,
                             "" if head else " (the remote did not answer: it may be newer)")
                    return target
                log.info("model repo %s: the remote moved to %s (cached: %s): updating %s", url, head[:12],
                         have[:12] or "unknown", target)
                marker_path(target).unlink()         # not complete again until the new commit is all there
                check_tools()
                _update(url, env, forms, target)
            else:
                check_tools()
                _clone_or_resume(url, env, forms, target, token)
            # Without git-lfs hooks installed for this repo (a fresh HOME, no global `git lfs install`),
            # `git lfs pull` downloads the objects but skips the checkout: the weights stay pointer stubs.
            _run_step(["lfs", "install", "--local"], env, forms, url, target)
            log.info("model repo %s: git lfs pull (downloading the weights)", url)
            progress = target / ".git" / "lfs-progress.log"
            progress.unlink(missing_ok=True)
            _run_step(["lfs", "pull"], {**env, "GIT_LFS_PROGRESS": str(progress)}, forms, url, target, progress)
            progress.unlink(missing_ok=True)
        commit = subprocess.run(["git", "-C", str(target), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        write_marker(target, url, commit)
        log.info("model repo %s: fetched commit %s into %s", url, commit[:12], target)
    return target


def _clone_or_resume(url: str, env: dict, forms: list[str], target: Path, token: str | None) -> None:
    if target.exists() and _usable_clone(target, url, env):
        log.info("model repo %s: resuming an interrupted fetch in %s", url, target)
        (target / ".git" / "index.lock").unlink(missing_ok=True)    # left by a killed git
        _run_step(["reset", "-q", "--hard", "HEAD"], env, forms, url, target)  # restore a cut checkout
        return
    if target.exists():
        log.info("model repo %s: removing an unusable half-finished clone in %s", url, target)
        shutil.rmtree(target)
    log.info("model repo %s: git clone into %s", url, target)
    try:
        _git(["clone", "--progress", "--", url, str(target)], env, forms)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"MODEL_REPO {url}: git clone failed: {_reason(exc)}{_hint(url, token)}") from None


def _update(url: str, env: dict, forms: list[str], target: Path) -> None:
    """Bring a finished clone to the remote's HEAD; its LFS objects already here are kept."""
    (target / ".git" / "index.lock").unlink(missing_ok=True)
    _run_step(["fetch", "-q", "--no-tags", "--", url, "+HEAD:refs/own-assistant/remote-head"], env, forms, url,
              target)
    _run_step(["reset", "-q", "--hard", "refs/own-assistant/remote-head"], env, forms, url, target)


def _run_step(args, env, forms, url, target: Path, progress: Path | None = None) -> None:
    try:
        _git(args, env, forms, cwd=target, progress_file=progress)
    except subprocess.CalledProcessError as exc:
        # Keep the clone: the next start resumes; LFS objects already downloaded are not fetched again.
        hint = _lfs_hint(url, target) if args[0] == "lfs" else ""
        raise UserError(f"MODEL_REPO {url}: git {' '.join(a for a in args if a != url)} failed: "
                        f"{_reason(exc)}{hint}") from None


def _lfs_hint(url: str, target: Path) -> str:
    """Why `git lfs pull` failed, as far as we can tell without asking the server again."""
    lfs_url = subprocess.run(["git", "-C", str(target), "config", "-f", ".lfsconfig", "--get", "lfs.url"],
                             capture_output=True, text=True).stdout.strip()
    if lfs_url and urlsplit(lfs_url).netloc.rpartition("@")[2] != urlsplit(url).netloc.rpartition("@")[2]:
        return (f" -- the repo's .lfsconfig sends LFS to {urlsplit(lfs_url).netloc.rpartition('@')[2] or lfs_url}, "
                "another host, which never gets MODEL_REPO_TOKEN (it goes only to the repo's own host): "
                "ask the owner to serve the LFS files from there or make them public")
    return (" -- the weights are missing from the remote's LFS storage (push them with `git lfs push --all "
            "origin`) or the token lacks access; the next start resumes")


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
