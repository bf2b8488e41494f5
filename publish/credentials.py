"""Where access tokens come from, how they reach git, and how they are kept out of every output.

Sources, in order: the target's environment variable (`OPENXLAB_TOKEN` / `HF_TOKEN`, with
`OPENXLAB_USER` / `HF_USER` for the user name), then git's own credential helper for that host
(`git credential fill`, never prompting). Nothing else: no token in argv, URLs or config files.

An env token reaches git through `askpass_env()`: a private throwaway GIT_ASKPASS script that
echoes two environment variables of the git process, plus `credential.helper=` (set through
GIT_CONFIG_* variables) so no configured helper stores or overrides it. `Masker` replaces the
token (raw, URL-encoded, and inside a Basic auth header) in any text we print or raise.
"""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import quote

from publish.targets import Target
from inference.errors import UserError

USER_VAR, TOKEN_VAR = "PUBLISH_GIT_USERNAME", "PUBLISH_GIT_PASSWORD"
ASKPASS = f"""#!/bin/sh
# Written by `python -m publish` for one git run; removed afterwards. The values live only in the
# environment of that git process.
case "$1" in
  [Uu]sername*) printf '%s\\n' "${USER_VAR}" ;;
  *) printf '%s\\n' "${TOKEN_VAR}" ;;
esac
"""
# Environment every git call gets: never prompt on a terminal or in a GUI; redact traces.
QUIET_GIT = {"GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never", "GIT_TRACE_REDACT": "1"}


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
        self.forms: list[str] = []
        if creds and creds.token:
            tok = creds.token
            forms = {tok, quote(tok, safe=""), base64.b64encode(f"{creds.username or ''}:{tok}".encode()).decode()}
            self.forms = sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)

    def __call__(self, text) -> str:
        text = str(text)
        for form in self.forms:
            text = text.replace(form, "***")
        return text


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


def _config_env(pairs: dict[str, str]) -> dict[str, str]:
    """Git config through GIT_CONFIG_COUNT/KEY/VALUE: inherited by git-lfs and its `git credential`."""
    start = int(os.environ.get("GIT_CONFIG_COUNT", "0") or 0)
    env = {"GIT_CONFIG_COUNT": str(start + len(pairs))}
    for i, (key, value) in enumerate(pairs.items(), start):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
    return env


@contextmanager
def askpass_env(creds: Credentials | None):
    """Environment additions that hand `creds` to git (and git-lfs) for the duration of the block."""
    if creds is None or not creds.via_env:
        yield dict(QUIET_GIT)      # git uses its own setup (ssh keys, credential helper)
        return
    tmp = tempfile.mkdtemp(prefix="publish-askpass-")
    try:
        script = os.path.join(tmp, "askpass.sh")
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(ASKPASS)
        yield {**QUIET_GIT, "GIT_ASKPASS": script, USER_VAR: creds.username or "git", TOKEN_VAR: creds.token,
               **_config_env({"credential.helper": ""})}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
