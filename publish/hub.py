"""Publish a bundle through the Hugging Face Hub API: the default route for `hf:` targets.

`create_repo(exist_ok=True)` then `upload_folder` of a staging dir (hard links to the bundle's
files), with `delete_patterns="*"` so the repo mirrors the bundle (the Hub never deletes
`.gitattributes`). Before uploading, the remote tree is compared with the bundle (sizes, then git
blob sha1 / LFS sha256), so an unchanged dir makes no commit and `--dry-run` can list the changes
without writing anything. The endpoint is `$HF_ENDPOINT` (default https://huggingface.co); set
`HF_HUB_DISABLE_XET=1` to send large files through the classic LFS batch API instead of Xet.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from publish.bundle import Bundle, describe, materialize, size_of
from publish.credentials import Credentials, Masker
from publish.gitops import Result
from publish.targets import Target
from inference.errors import UserError


def _digest(content, algo: str) -> str:
    """sha256 (LFS oid) or git blob sha1 (regular file oid) of a bundle entry, streamed."""
    size = size_of(content)
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(f"blob {size}\0".encode())
    if isinstance(content, bytes):
        h.update(content)
    else:
        with open(content, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _remote_files(api, target: Target) -> dict | None:
    """{path: RepoFile} of the repo's main branch, or None when the repo does not exist yet."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        tree = api.list_repo_tree(target.repo_id, repo_type=target.repo_type, recursive=True)
        return {f.path: f for f in tree if hasattr(f, "blob_id")}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None


def plan(bundle: Bundle, remote: dict | None) -> list[str]:
    """`A/M/D path` lines that make the remote equal to the bundle."""
    remote = remote or {}
    out = []
    for rel, content in sorted(bundle.items()):
        have = remote.get(rel)
        if have is None:
            out.append(f"A {describe(bundle, rel)}")
        elif have.size != size_of(content):
            out.append(f"M {describe(bundle, rel)}")
        elif have.lfs is not None and have.lfs.sha256 != _digest(content, "sha256"):
            out.append(f"M {describe(bundle, rel)}")
        elif have.lfs is None and have.blob_id != _digest(content, "sha1"):
            out.append(f"M {describe(bundle, rel)}")
    out += [f"D {path}" for path in sorted(remote) if path not in bundle and path != ".gitattributes"]
    return out


def _fail(exc: Exception, target: Target, masker: Masker, what: str) -> UserError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return UserError(f"{what} {target.display} failed: HTTP {status}, authentication refused -- "
                         f"check {target.token_env} (a token with write access)")
    first = masker(str(exc)).strip().splitlines()
    return UserError(f"{what} {target.display} failed: {first[0] if first else exc.__class__.__name__}"
                     + (f" (HTTP {status})" if status and f"{status}" not in (first[0] if first else "") else ""))


def upload_bundle(bundle: Bundle, target: Target, creds: Credentials | None, message: str,
                  private: bool = False, dry_run: bool = False, echo=print, verify=None) -> Result:
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    masker = Masker(creds)
    api = HfApi(endpoint=target.endpoint, token=creds.token if creds else False)
    remote_errors = (HfHubHTTPError, httpx.HTTPError, OSError)
    try:
        remote = _remote_files(api, target)
    except remote_errors as exc:
        raise _fail(exc, target, masker, "reading") from None
    changes = plan(bundle, remote)
    if changes and verify:
        verify()
    if remote is not None and not changes:
        return Result(None, False, [], dry_run)
    if dry_run:
        if remote is None:
            echo(f"{target.display} does not exist yet: it would be created"
                 + (" (private)" if private else ""))
        return Result(None, bool(changes), changes, True)
    stage = Path(tempfile.mkdtemp(prefix="publish-hub-"))
    try:
        materialize(bundle, stage, link=True)
        echo(f"uploading {len(changes)} change(s) to {target.display} via {target.endpoint}")
        api.create_repo(target.repo_id, repo_type=target.repo_type, private=private or None, exist_ok=True,
                        space_sdk="gradio" if target.repo_type == "space" else None)
        info = api.upload_folder(folder_path=stage, repo_id=target.repo_id, repo_type=target.repo_type,
                                 commit_message=message, delete_patterns="*")
        head = info.oid
    except remote_errors as exc:
        raise _fail(exc, target, masker, "upload to") from None
    except RuntimeError as exc:      # huggingface_hub wraps a failed LFS PUT in RuntimeError
        if isinstance(exc.__cause__, remote_errors):
            raise _fail(exc.__cause__, target, masker, "upload to") from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Result(head, True, changes)
