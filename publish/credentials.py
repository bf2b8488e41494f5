"""Where access tokens come from, how they reach git, and how they are kept out of every output.

Sources, in order: the target's environment variable (`OPENXLAB_TOKEN` / `HF_TOKEN`, with
`OPENXLAB_USER` / `HF_USER` for the user name), then git's own credential helper for that host
(`git credential fill`, never prompting). Nothing else: no token in argv, URLs or config files.

An env token reaches git through `askpass_env(creds, url)`, a thin wrapper of the one credential
helper of the core (inference/credentials.py, shared with fetch): it answers only for the host of
the target URL (an LFS endpoint elsewhere gets nothing), refuses plain http:// except to localhost,
and resets `credential.helper` so no configured helper stores or overrides it. `Masker` replaces the
token (raw, URL-encoded, and inside a Basic auth header) in any text we print or raise.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field

from publish.targets import Target
from inference.credentials import QUIET_GIT, git_credentials, mask, secret_forms
from inference.errors import UserError


@dataclass
class Credentials:
    username: str | None
    token: str | None = field(default=None, repr=False)
    source: str = ""            # "OPENXLAB_TOKEN", "git credential helper", ...

    @property
    def via_env(self) -> bool:
        return self.token is not None and self.source != "git credential helper"


class Masker:
    """Replace every form of the secrets in a text with `***`."""

    def __init__(self, creds: Credentials | None = None):
        self.forms = secret_forms(creds.username, creds.token) if creds else []

    def __call__(self, text) -> str:
        return mask(text, self.forms)


def helper_credentials(url: str) -> tuple[str | None, str] | None:
    """(user, password) from git's configured credential helper for `url`, or None. Never prompts."""
    if shutil.which("git") is None:
        return None
    env = {**os.environ, **QUIET_GIT, "GIT_ASKPASS": ""}
    env.pop("SSH_ASKPASS", None)
    try:
        out = subprocess.run(["git", "credential", "fill"], input=f"url={url}\n\n", env=env, text=True,
                             capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    values = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return (values.get("username"), values["password"]) if values.get("password") else None


def resolve(target: Target, required: bool = True) -> Credentials | None:
    """Credentials for a target that needs a token (openxlab, hf); None for plain git targets,
    which use whatever git itself is configured with (ssh keys, credential helpers)."""
    if not target.token_env:
        return None
    token = os.environ.get(target.token_env)
    namespace = target.repo_id.split("/")[0] if target.repo_id else None
    user = os.environ.get(target.user_env or "") or namespace
    if token:
        return Credentials(user, token, target.token_env)
    found = helper_credentials(target.url) if target.is_https else None
    if found:
        return Credentials(found[0] or user, found[1], "git credential helper")
    if not required:
        return None
    users = f"{target.user_env} and " if target.scheme == "openxlab" else ""
    raise UserError(f"no credentials for {target.display}: set {users}{target.token_env} (an access token with "
                    f"write access), or store one in git's credential helper for {target.url.split('/')[2]}")


@contextmanager
def askpass_env(creds: Credentials | None, url: str):
    """Environment additions that hand `creds` to git (and git-lfs) for `url`'s host, for the block."""
    if creds is None or not creds.via_env:
        yield dict(QUIET_GIT)      # git uses its own setup (ssh keys, credential helper)
        return
    with git_credentials(url, creds.username, creds.token) as env:
        yield env
