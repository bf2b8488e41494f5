"""Send a bundle to its target by the right route and report what happened in one line.

    hf:   Hub API (create_repo + upload_folder) by default; `--via git` pushes with git-lfs instead
          (the repo is still created through the API first, as the Hub refuses pushes to unknown repos)
    openxlab:, git:   git + git-lfs (publish.gitops)

Credentials are resolved here (publish.credentials) before anything touches the remote, so a
missing token stops the run with nothing written.
"""
from __future__ import annotations

from publish.bundle import Bundle
from publish.credentials import Masker, resolve
from inference.credentials import check_transport
from publish.gitops import Result, push_bundle
from publish.targets import Target
from inference.errors import UserError


def _create_hf_repo(target: Target, creds, private: bool) -> None:
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi(endpoint=target.endpoint, token=creds.token).create_repo(
            target.repo_id, repo_type=target.repo_type, private=private or None, exist_ok=True,
            space_sdk="gradio" if target.repo_type == "space" else None)
    except (HfHubHTTPError, httpx.HTTPError, OSError) as exc:
        raise UserError(f"creating {target.display} failed: {Masker(creds)(exc).splitlines()[0]}") from None


def deliver(bundle: Bundle, target: Target, message: str, *, private: bool = False, dry_run: bool = False,
            via: str = "auto", echo=print, verify=None) -> Result:
    """`verify`: a check to run only when there is something to publish, before any write."""
    if via not in ("auto", "api", "git"):
        raise UserError(f"--via {via!r}: use api or git")
    if via == "api" and target.scheme != "hf":
        raise UserError(f"--via api works only for hf: targets, not {target.display}")
    creds = resolve(target, required=not dry_run)
    check_transport(target.url, creds.token if creds else None, f"target {target.display}")
    if target.scheme == "hf" and via != "git":
        from publish.hub import upload_bundle

        return upload_bundle(bundle, target, creds, message, private=private, dry_run=dry_run, echo=echo,
                             verify=verify)
    if private and target.scheme != "hf":
        echo("note: --private only applies when the Hub creates the repo; set visibility on the host's website")
    if target.scheme == "hf" and not dry_run:
        _create_hf_repo(target, creds, private)
    return push_bundle(bundle, target, creds, message, dry_run=dry_run, echo=echo, verify=verify)


def report(result: Result, target: Target, echo=print) -> None:
    for line in result.changes:
        echo(f"  {line}")
    if result.dry_run:
        echo(f"dry run: {len(result.changes)} change(s) would be published to {target.display}; nothing was written"
             if result.changed else f"dry run: {target.display} is already up to date; nothing to publish")
    elif result.changed:
        echo(f"published {len(result.changes)} change(s) to {target.display} (commit {str(result.commit)[:12]}): "
             f"{target.web_url}")
    else:
        echo(f"{target.display} is already up to date: nothing to publish, no new commit")
