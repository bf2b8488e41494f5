"""One way a token reaches git and git-lfs, scoped to the host of the repo URL; shared by fetch and publish.

    from inference.credentials import check_transport, git_credentials
    check_transport(url, token)                      # a token over http:// only to localhost, else UserError
    with git_credentials(url, user, token) as extra:  # env additions for every git / git-lfs process
        subprocess.run(["git", "clone", "--", url, dest], env={**os.environ, **extra})

The token lives only in the environment of the git processes: a throwaway helper script (mode 0700,
removed after the block) is installed as the *only* git credential helper (`credential.helper=`
resets the user's list first, so nothing configured stores the token). git and git-lfs ask it with
the structured `protocol=` / `host=` lines of git's credential protocol, and it answers only for the
protocol and host (with port) of the repo URL. An LFS endpoint elsewhere (a repo's `.lfsconfig`
`lfs.url`, a redirect) gets no answer. The same script is GIT_ASKPASS, where git falls back when no
helper answered: there it answers nothing (exit 1), so git fails with "could not read Username" instead
of prompting or guessing. `mask()` replaces the token (raw, URL-encoded, inside a Basic auth header) in
any text we print or raise.
"""
from __future__ import annotations

import base64
import os
import shlex
import shutil
import tempfile
from contextlib import contextmanager
from urllib.parse import quote, urlsplit

from inference.errors import UserError

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
USER_VAR, TOKEN_VAR = "OWN_ASSISTANT_GIT_USER", "OWN_ASSISTANT_GIT_TOKEN"
PROTOCOL_VAR, HOST_VAR = "OWN_ASSISTANT_GIT_PROTOCOL", "OWN_ASSISTANT_GIT_HOST"
# Environment every git call gets: never prompt on a terminal or in a GUI; redact curl traces.
QUIET_GIT = {"GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never", "GIT_TRACE_REDACT": "1"}
HELPER = f"""#!/bin/sh
# Written for one git run and removed afterwards; the values live only in that process's environment.
# As a credential helper ("get"): answer only for the repo's own protocol and host.
# As GIT_ASKPASS (any other argument): a prompt no helper answered -- say nothing, so git fails.
case "$1" in
  get)
    proto= host=
    while IFS= read -r line && [ -n "$line" ]; do
      case "$line" in
        protocol=*) proto=${{line#protocol=}} ;;
        host=*) host=${{line#host=}} ;;
      esac
    done
    if [ -n "$proto" ] && [ "$proto" = "${PROTOCOL_VAR}" ] && [ "$host" = "${HOST_VAR}" ]; then
      printf 'username=%s\\npassword=%s\\n' "${USER_VAR}" "${TOKEN_VAR}"
    fi ;;
  store|erase) cat >/dev/null ;;
  *) exit 1 ;;
esac
"""


def scope(url: str) -> tuple[str, str]:
    """(protocol, host[:port]) as git's credential protocol names them for `url`."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.rpartition("@")[2].lower()


def check_transport(url: str, token: str | None, what: str = "the repo") -> None:
    """A token may travel over https, or over http only to this machine (a local test server)."""
    parts = urlsplit(url)
    if token and parts.scheme.lower() == "http" and (parts.hostname or "") not in LOCAL_HOSTS:
        raise UserError(f"{what}: refusing to send a token over plain http:// to {parts.hostname} (anyone on the "
                        "way could read it) -- use https:// (http:// only to localhost)")


def config_env(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Git config through GIT_CONFIG_COUNT/KEY/VALUE: inherited by git-lfs and its `git credential`."""
    start = int(os.environ.get("GIT_CONFIG_COUNT", "0") or 0)
    env = {"GIT_CONFIG_COUNT": str(start + len(pairs))}
    for i, (key, value) in enumerate(pairs, start):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
    return env


@contextmanager
def git_credentials(url: str, user: str | None, token: str | None):
    """Environment additions that hand `token` to git and git-lfs for `url`'s host only, for the block.
    No token: only the no-prompt settings (git uses its own setup: ssh keys, credential helpers)."""
    if not token:
        yield dict(QUIET_GIT)
        return
    check_transport(url, token)
    protocol, host = scope(url)
    tmp = tempfile.mkdtemp(prefix="own-assistant-cred-")
    try:
        script = os.path.join(tmp, "credential.sh")
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(HELPER)
        # An empty value first resets git's helper list: no configured helper sees or stores the token.
        helpers = [("credential.helper", ""), ("credential.helper", "!" + shlex.quote(script))]
        yield {**QUIET_GIT, "GIT_ASKPASS": script, "SSH_ASKPASS": script, USER_VAR: user or "git",
               TOKEN_VAR: token, PROTOCOL_VAR: protocol, HOST_VAR: host, **config_env(helpers)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def secret_forms(user: str | None, token: str | None) -> list[str]:
    """Every form a token takes in git's and curl's output, longest first."""
    if not token:
        return []
    forms = {token, quote(token, safe=""), base64.b64encode(f"{user or ''}:{token}".encode()).decode()}
    return sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)


def mask(text, forms: list[str]) -> str:
    text = str(text)
    for form in forms:
        text = text.replace(form, "***")
    return text
