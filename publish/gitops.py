"""Publish a bundle to a git remote with git-lfs: the route for openxlab:, git: and `hf: --via git`.

In a throwaway repo: fetch the remote's branch (or start one when the remote is empty), lay the
bundle down so the tree mirrors it exactly (.gitattributes kept), `git lfs track` the weight
patterns and every file over 5 MB, stage, check that each of those is a real LFS pointer (never
a 130-byte stub or a multi-GB blob in git), commit only if something changed, push the LFS objects
(`git lfs push`) and then the branch, and confirm the remote now points at the new commit.

Every git call runs without prompts, with credentials only through `credentials.askpass_env` (scoped
to the target's host), with `--` before the URL, and with its output passed through the token
`Masker` before it is printed or raised.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from publish.bundle import LFS_PATTERNS, LARGE_BYTES, Bundle, describe, materialize, size_of, wants_lfs
from publish.credentials import Credentials, Masker, askpass_env
from publish.targets import Target
from inference.repo_files import LFS_POINTER_PREFIX
from inference.errors import UserError

DEFAULT_BRANCH = "main"
# Never inherited from a calling hook or shell: they would point git at another repo.
DROP_ENV = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_CEILING_DIRECTORIES")


@dataclass
class Result:
    commit: str | None                 # the commit now at the remote head (None: remote still empty)
    changed: bool                      # a new commit was (or, with dry_run, would be) pushed
    changes: list[str] = field(default_factory=list)   # "A path (size, LFS)" lines
    dry_run: bool = False


class GitFailed(Exception):
    def __init__(self, args, output: str):
        super().__init__(output)
        self.args_ = args
        self.output = output


class Git:
    """Runs git with a fixed environment; output comes back masked."""

    def __init__(self, env: dict, masker: Masker, echo=print):
        self.env = {k: v for k, v in {**os.environ, **env, "LC_ALL": "C", "GIT_LFS_SKIP_SMUDGE": "1"}.items()
                    if k not in DROP_ENV}
        self.mask = masker
        self.echo = echo

    def __call__(self, *args, cwd=None, stream: bool = False) -> str:
        cmd = ["git", *args]
        if not stream:
            out = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True, errors="replace")
            text = self.mask(out.stdout + out.stderr)
            if out.returncode != 0:
                raise GitFailed(args, text)
            return self.mask(out.stdout)
        # Long transfers: show git's lines as they come (masked), keep them for the error message.
        proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        lines = []
        for line in proc.stdout:
            line = self.mask(line.rstrip())
            if line.strip():
                lines.append(line)
                self.echo(f"  {line}")
        if proc.wait() != 0:
            raise GitFailed(args, "\n".join(lines))
        return "\n".join(lines)


def _reason(output: str, target: Target) -> str:
    """One line out of git's output: the known causes spelled out, else git's own last error lines."""
    low = output.lower()
    host = target.url.split("/")[2] if "://" in target.url else target.url
    if (any(s in low for s in ("authentication failed", "could not read username", "could not read password",
                               "invalid credentials", "permission denied (publickey"))
            or re.search(r"returned error: 40[13]\b", low)):
        who = f"check {target.user_env} and {target.token_env}" if target.token_env else \
            "check your credential helper or ssh key"
        return f"authentication failed -- {who}"
    if (any(s in low for s in ("does not appear to be a git repository", "repository not found"))
            or re.search(r"returned error: 404\b|repository '[^']*' not found", low)):
        how = {"openxlab": "create the empty model repo on https://openxlab.org.cn first",
               "hf": "create the repo on the Hub first (the default API route creates it)"}.get(
            target.scheme, f"create it first, e.g. `git init --bare -b main {target.url}`")
        return f"repository not found -- {how}"
    if any(s in low for s in ("could not resolve host", "connection refused", "failed to connect", "timed out")):
        return f"cannot reach {host} -- check the address and your network"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith(("remote:", "!", "error:", "fatal:"))] or lines
    return " | ".join(said[-3:]) or "no output"


def require_git_lfs(git: Git) -> None:
    if shutil.which("git") is None:
        raise UserError("git is not installed -- install git and git-lfs (apt-get install git git-lfs)")
    try:
        git("lfs", "version")
    except GitFailed:
        raise UserError("git-lfs is not installed -- `apt-get install git-lfs` (or https://git-lfs.com), "
                        "then run again") from None


def remote_state(git: Git, target: Target) -> tuple[str, dict[str, str]]:
    """(branch to publish to, {ref: sha}) from one `git ls-remote`; an empty remote gives main, {}."""
    try:
        out = git("ls-remote", "--symref", "--", target.url)
    except GitFailed as exc:
        raise UserError(f"cannot read {target.display}: {_reason(exc.output, target)}") from None
    refs, branch = {}, None
    for line in out.splitlines():
        left, _, right = line.partition("\t")
        if left.startswith("ref: ") and right == "HEAD":
            branch = left[5:].removeprefix("refs/heads/")
        elif right:
            refs[right] = left
    if branch is None:
        heads = sorted(r.removeprefix("refs/heads/") for r in refs if r.startswith("refs/heads/"))
        branch = DEFAULT_BRANCH if not heads or DEFAULT_BRANCH in heads else heads[0]
    return branch, refs


def _track(git: Git, work: Path, bundle: Bundle) -> None:
    attrs = work / ".gitattributes"
    known = attrs.read_text(encoding="utf-8", errors="replace").split("\n") if attrs.is_file() else []
    tracked = {line.split()[0] for line in known if "filter=lfs" in line and line.split()}
    missing = [p for p in LFS_PATTERNS if p not in tracked]
    if missing:
        git("lfs", "track", *missing, cwd=work)
    large = [rel for rel, c in sorted(bundle.items())
             if wants_lfs(rel, size_of(c)) and not any(Path(rel).match(p) for p in LFS_PATTERNS)
             and rel not in tracked]
    if large:
        git("lfs", "track", "--filename", *large, cwd=work)


def _check_staged(git: Git, work: Path, bundle: Bundle) -> None:
    """Every big/binary file must be staged as an LFS pointer; no big blob may go into git itself."""
    entries = {}
    for rec in git("ls-files", "-s", "-z", cwd=work).split("\0"):
        if rec:
            meta, path = rec.split("\t", 1)
            entries[path] = meta.split()[1]
    sizes = dict(line.split() for line in git_batch(git, work, list(entries.values())).splitlines() if line)
    for path, sha in entries.items():
        content = bundle.get(path)
        should = content is not None and wants_lfs(path, size_of(content))
        if should:
            size = int(sizes.get(sha, 0))
            if size > 1024 or not git("cat-file", "blob", sha, cwd=work).encode().startswith(LFS_POINTER_PREFIX):
                raise UserError(f"{path}: git-lfs did not take this file (it would go into git as a "
                                f"{size}-byte blob) -- check that git-lfs works (`git lfs install`)")
        elif int(sizes.get(sha, 0)) >= LARGE_BYTES:
            raise UserError(f"{path}: {sizes[sha]} bytes would go into git itself, not LFS -- refusing")


def git_batch(git: Git, work: Path, shas: list[str]) -> str:
    """`sha size` lines for the given objects."""
    out = subprocess.run(["git", "cat-file", "--batch-check=%(objectname) %(objectsize)"], cwd=work,
                         env=git.env, input="\n".join(shas) + "\n", capture_output=True, text=True)
    return out.stdout


def _identity(git: Git, work: Path) -> None:
    for key, value in (("user.name", "python -m publish"), ("user.email", "publish@localhost")):
        try:
            git("config", key, cwd=work)
        except GitFailed:            # not configured anywhere: a neutral identity for this repo only
            git("config", key, value, cwd=work)


def _changes(git: Git, work: Path, bundle: Bundle, has_head: bool) -> list[str]:
    if has_head:
        out = git("diff", "--cached", "--name-status", "--no-renames", "-z", "HEAD", cwd=work).split("\0")
        pairs = list(zip(out[0::2], out[1::2]))
    else:
        pairs = [("A", p) for p in git("ls-files", "-z", cwd=work).split("\0") if p]
    return [f"{status} {describe(bundle, path)}" for status, path in pairs if status]


def push_bundle(bundle: Bundle, target: Target, creds: Credentials | None, message: str,
                dry_run: bool = False, echo=print, verify=None) -> Result:
    """`verify()` runs once the change list is known and non-empty, before anything is written."""
    masker = Masker(creds)
    with askpass_env(creds, target.url) as env:
        git = Git(env, masker, echo)
        require_git_lfs(git)
        branch, refs = remote_state(git, target)
        head = refs.get(f"refs/heads/{branch}")
        work = Path(tempfile.mkdtemp(prefix="publish-git-"))
        try:
            git("init", "-q", "-b", branch, str(work))
            git("remote", "add", "--", "origin", target.url, cwd=work)
            git("lfs", "install", "--local", "--skip-repo", cwd=work)
            git("config", "lfs.locksverify", "false", cwd=work)    # model repos use no LFS locks
            if head:
                echo(f"fetching {target.display} ({branch})")
                try:
                    git("fetch", "-q", "--no-tags", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}",
                        cwd=work)
                except GitFailed as exc:
                    raise UserError(f"fetch from {target.display} failed: {_reason(exc.output, target)}") from None
                git("update-ref", f"refs/heads/{branch}", f"refs/remotes/origin/{branch}", cwd=work)
                git("read-tree", "HEAD", cwd=work)       # index = remote tree; worktree gets only the bundle
                if git("ls-tree", "HEAD", ".gitattributes", cwd=work).strip():
                    git("checkout", "HEAD", "--", ".gitattributes", cwd=work)
            materialize(bundle, work)
            _track(git, work, bundle)
            git("add", "-A", cwd=work)
            _check_staged(git, work, bundle)
            changes = _changes(git, work, bundle, has_head=bool(head))
            if changes and verify:
                verify()
            if not changes or dry_run:
                return Result(head, bool(changes), changes, dry_run)
            _identity(git, work)
            git("commit", "-q", "--no-verify", "-m", message, cwd=work)
            commit = git("rev-parse", "HEAD", cwd=work).strip()
            echo(f"pushing {len(changes)} change(s) to {target.display}")
            try:
                git("lfs", "push", "origin", branch, cwd=work, stream=True)
                git("push", "-q", "--no-verify", "origin", f"{branch}:refs/heads/{branch}", cwd=work, stream=True)
                remote_head = git("ls-remote", "origin", f"refs/heads/{branch}", cwd=work).split("\t")[0]
            except GitFailed as exc:
                raise UserError(f"push to {target.display} failed: {_reason(exc.output, target)}") from None
            if remote_head != commit:
                raise UserError(f"push to {target.display}: remote {branch} is at {remote_head[:12] or 'nothing'}, "
                                f"expected {commit[:12]} -- someone else pushed? run again")
            return Result(commit, True, changes)
        except GitFailed as exc:          # a local git step (disk full, broken git-lfs ...): one line, masked
            raise UserError(f"git {exc.args_[0]} failed while publishing to {target.display}: "
                            f"{_reason(exc.output, target)}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
