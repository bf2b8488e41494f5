"""Download a Hugging Face model repo with `huggingface_hub.snapshot_download`; the token goes to the Hub only.

    from inference.hub_download import hub_commit, hub_snapshot
    commit = hub_commit("alice/lumi", "https://huggingface.co", token, target_dir, known_commit)
    if commit != known_commit:
        hub_snapshot("alice/lumi", "https://huggingface.co", token, target_dir, commit)

Called by inference/fetch.py for `USER/REPO` ids and Hub page URLs (git stays the route for OpenXLab
and plain git URLs). One cheap API call (`repo_info`) says which commit the repo is at; when that is
the commit already in `target_dir`, nothing is downloaded. Otherwise `snapshot_download(local_dir=...)`
fetches exactly that commit: files already present with the right hash are kept and a download cut
midway resumes (huggingface_hub keeps its partial files under `.cache/huggingface/` in the dir).
huggingface_hub sends the token to the endpoint only and drops it when a file is redirected to a
storage host. An unreachable Hub with a finished copy here keeps that copy.
"""
from __future__ import annotations

import logging
from pathlib import Path

from inference.errors import UserError

log = logging.getLogger("own_assistant.fetch")


def _one_line(exc: Exception) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return lines[0] if lines else type(exc).__name__


def hub_commit(repo_id: str, endpoint: str, token: str | None, target: Path, known: str | None) -> str:
    """The commit the repo's main branch is at (one API call). `known`: the commit a finished download
    left in `target` (None: nothing finished yet), returned as it is when the Hub cannot be asked."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"MODEL_REPO {repo_id} (Hugging Face, {endpoint})"
    try:
        return HfApi(endpoint=endpoint, token=token or False).repo_info(repo_id, repo_type="model").sha or ""
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        if known is not None:
            log.warning("%s: %s -- serving the copy in %s", where, _one_line(exc), target)
            return known
        hint = "" if token else " -- a private repo also needs MODEL_REPO_TOKEN"
        raise UserError(f"{where}: {_one_line(exc)}{hint}") from None
    except (HfHubHTTPError, httpx.HTTPError, OfflineModeIsEnabled, OSError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403) and known is None:
            hint = "check MODEL_REPO_TOKEN" if token else "a private repo needs MODEL_REPO_TOKEN"
            raise UserError(f"{where}: no access (HTTP {status}) -- {hint}") from None
        if known is not None:
            log.info("%s: the Hub did not answer (%s): using the copy in %s", where, _one_line(exc), target)
            return known
        raise UserError(f"{where}: cannot reach the Hub: {_one_line(exc)} -- check the network "
                        "(HF_HUB_OFFLINE must be unset to download)") from None


def hub_snapshot(repo_id: str, endpoint: str, token: str | None, target: Path, commit: str) -> None:
    """Download exactly `commit` into `target`; what is already there with the right hash is kept."""
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    where = f"MODEL_REPO {repo_id} (Hugging Face, {endpoint})"
    log.info("%s: downloading commit %s into %s", where, commit[:12] or "?", target)
    try:
        snapshot_download(repo_id, repo_type="model", revision=commit or None, local_dir=target, endpoint=endpoint,
                          token=token or False)
    except (HfHubHTTPError, httpx.HTTPError, OfflineModeIsEnabled, OSError) as exc:
        raise UserError(f"{where}: download failed: {_one_line(exc)} -- the next start resumes") from None
    log.info("%s: fetched commit %s into %s", where, commit[:12] or "?", target)
