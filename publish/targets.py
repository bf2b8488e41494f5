"""Parse a publish TARGET into where it goes and which credentials it needs.

    openxlab:USER/REPO   -> https://code.openxlab.org.cn/USER/REPO.git   (OPENXLAB_USER + OPENXLAB_TOKEN)
    hf:USER/REPO         -> Hugging Face Hub at $HF_ENDPOINT (HF_TOKEN); a Space when publishing the app
    git:URL_OR_PATH      -> any git remote (https, ssh, file://, or a local path to a bare repo)

A bare `https://...`, `ssh://...`, `file://...` URL or an existing local path is taken as `git:`.
Credentials never belong in a TARGET: a URL with `user:password@` is refused (and not echoed back).
`OPENXLAB_ENDPOINT` points `openxlab:` at another server (a self-hosted mirror, or a test server).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from inference.errors import UserError
from inference.repo_files import HUB_ID

OPENXLAB_GIT = "https://code.openxlab.org.cn"
HF_DEFAULT = "https://huggingface.co"

GIT_URL_SCHEMES = ("https", "http", "ssh", "git", "file")
SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:(?!//)")   # git@github.com:user/repo.git
HELP = "use openxlab:USER/REPO, hf:USER/REPO or git:URL_OR_PATH"


@dataclass(frozen=True)
class Target:
    scheme: str                 # "openxlab" | "hf" | "git"
    url: str                    # the git remote (never carries credentials)
    repo_id: str | None = None  # USER/REPO for openxlab and hf
    repo_type: str = "model"    # "model" or "space" (hf app)
    endpoint: str | None = None     # hf: the Hub API root
    token_env: str | None = None    # env var holding the access token, when the host needs one
    user_env: str | None = None     # env var holding the user name for git over https

    @property
    def display(self) -> str:
        """What we print: the scheme form for hosted repos, the URL for plain git."""
        return f"{self.scheme}:{self.repo_id}" if self.repo_id else self.url

    @property
    def is_https(self) -> bool:
        return urlsplit(self.url).scheme in ("https", "http")

    @property
    def web_url(self) -> str:
        if self.scheme == "openxlab" and self.url.startswith(OPENXLAB_GIT):
            return f"https://openxlab.org.cn/models/detail/{self.repo_id}"
        if self.scheme == "hf":
            return f"{self.endpoint}/{'spaces/' if self.repo_type == 'space' else ''}{self.repo_id}"
        return self.url


def _repo_id(text: str, scheme: str) -> str:
    if not HUB_ID.match(text):
        raise UserError(f"target {scheme}:{text!r}: expected {scheme}:USER/REPO (letters, digits, '-', '_', '.')")
    return text


def _refuse_credentials(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme in ("https", "http") and (parts.password is not None or parts.username is not None):
        # Never echo the URL: the part before '@' is probably a token.
        raise UserError(f"target {parts.scheme}://...@{parts.hostname}: remove the user/token from the URL -- "
                        "tokens go in environment variables or git's credential helper, never in URLs")


def _git_target(text: str) -> Target:
    scheme = urlsplit(text).scheme
    if scheme in GIT_URL_SCHEMES:
        _refuse_credentials(text)
        return Target("git", text.rstrip("/"))
    if SCP_LIKE.match(text):
        return Target("git", text)
    if scheme and len(scheme) > 1:       # "s3://x", "ftp://x": a URL we cannot push to (C:\ is a path)
        raise UserError(f"target {scheme}://...: unknown URL scheme {scheme!r} -- {HELP}")
    return Target("git", str(Path(text).expanduser().resolve()))


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT).rstrip("/")


def parse_target(text: str, repo_type: str = "model") -> Target:
    """`repo_type="space"` when publishing the app: an `hf:` target is then a Gradio Space."""
    text = (text or "").strip()
    if not text:
        raise UserError(f"no target given -- {HELP}")
    scheme, sep, rest = text.partition(":")
    if sep and scheme == "openxlab":
        repo_id = _repo_id(rest, scheme)
        base = (os.environ.get("OPENXLAB_ENDPOINT") or OPENXLAB_GIT).rstrip("/")
        _refuse_credentials(base)
        return Target("openxlab", f"{base}/{repo_id}.git", repo_id=repo_id,
                      token_env="OPENXLAB_TOKEN", user_env="OPENXLAB_USER")
    if sep and scheme == "hf":
        repo_id = _repo_id(rest, scheme)
        endpoint = hf_endpoint()
        _refuse_credentials(endpoint)
        prefix = "spaces/" if repo_type == "space" else ""
        return Target("hf", f"{endpoint}/{prefix}{repo_id}.git", repo_id=repo_id, repo_type=repo_type,
                      endpoint=endpoint, token_env="HF_TOKEN", user_env="HF_USER")
    if sep and scheme == "git":
        if not rest:
            raise UserError(f"target 'git:' needs a URL or path -- {HELP}")
        return _git_target(rest)
    if "://" in text or SCP_LIKE.match(text) or Path(text).expanduser().exists():
        return _git_target(text)
    if sep and re.fullmatch(r"[A-Za-z][\w+.-]*", scheme) and len(scheme) > 1:
        raise UserError(f"target {scheme}:...: unknown scheme {scheme + ':'!r} -- {HELP}")
    raise UserError(f"target {text!r}: not a known target and no such path -- {HELP}")
