"""`python -m publish model --to hf:...` against a local fake Hub (tests/fake_hub.py), both routes.

Proves: the default route (huggingface_hub create_repo + upload_folder) stores the model dir byte for
byte with the weights sent through the LFS batch API + PUT (not inline in the commit), republishing
makes no commit, `--dry-run` lists a change without any write request, a bad token is a one-line
error; and the `--via git` fallback creates the repo (private when asked) and pushes the same content
over authenticated git + git-lfs.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import publish

from fake_hub import FakeHub, isolated_git_env
from publish.credentials import Credentials, askpass_env

ROOT = Path(publish.__file__).resolve().parent.parent    # the project root: `python -m publish` runs there
TOKEN = f"hf_test_{uuid.uuid4().hex}"
WRITES = ("POST /api/repos/create", "POST /api/models/alice/lumi/preupload/main", "POST /api/models/alice/lumi/commit/main")


@pytest.fixture
def hub(tmp_path):
    h = FakeHub(tmp_path / "hub", token=TOKEN).start()
    yield h
    h.stop()


@pytest.fixture
def env(tmp_path, hub):
    e = isolated_git_env(tmp_path / "home")
    return {**e, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def publish(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "publish", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def dir_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(d).parts}


def without_info(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != "assistant.json"}


def assert_public_info(pushed: bytes, local: bytes) -> None:
    """The pushed assistant.json is the local one without the machine's paths (base model, adapter)."""
    local_info = json.loads(local)
    assert local_info["base_model"].startswith("/") and local_info["adapter"].startswith("/")
    assert json.loads(pushed) == {k: v for k, v in local_info.items() if k not in ("base_model", "adapter")}


def calls(hub) -> list[str]:
    return [f"{m} {p}" for m, p in hub.requests]


def test_hf_api_route(merged_model, tmp_path, hub, env):
    r = publish("model", str(merged_model), "--to", "hf:alice/lumi", env=env)
    assert r.returncode == 0, r.stderr
    stored = hub.files("alice/lumi")
    want = dir_files(merged_model)
    assert {k: v for k, v in stored.items() if k in want and k != "assistant.json"} == without_info(want)
    assert set(want) <= set(stored)
    assert_public_info(stored["assistant.json"], want["assistant.json"])
    assert "README.md" in stored and b"sdk:" not in stored["README.md"]
    tree = hub.tree("alice/lumi")
    assert tree["model.safetensors"]["lfs"] is not None and tree["config.json"]["lfs"] is None
    oid = hashlib.sha256(want["model.safetensors"]).hexdigest()
    assert f"PUT /alice/lumi.git/info/lfs/objects/{oid}" in calls(hub)      # weights went through LFS
    assert TOKEN not in r.stdout + r.stderr

    head, n = hub.head("alice/lumi"), len(hub.requests)
    r = publish("model", str(merged_model), "--to", "hf:alice/lumi", env=env)
    assert r.returncode == 0 and "already up to date" in r.stdout, r.stdout + r.stderr
    assert hub.head("alice/lumi") == head
    assert not any(c in calls(hub)[n:] for c in WRITES)

    changed = tmp_path / "changed"
    changed.mkdir()
    for name, data in want.items():
        (changed / name).write_bytes(data)
    (changed / "assistant.json").write_text('{"system_prompt": "You are Lumi."}')
    n = len(hub.requests)
    r = publish("model", str(changed), "--to", "hf:alice/lumi", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert "M assistant.json" in r.stdout and "M README.md" in r.stdout and "model.safetensors" not in r.stdout
    new = calls(hub)[n:]
    assert not any(c.startswith("PUT") or c in WRITES for c in new), new
    assert hub.head("alice/lumi") == head

    bad = publish("model", str(merged_model), "--to", "hf:alice/other", env={**env, "HF_TOKEN": "hf_wrong_token"})
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "authentication refused" in lines[0] and "hf_wrong_token" not in bad.stderr


def test_hf_git_fallback(merged_model, tmp_path, hub, env):
    r = publish("model", str(merged_model), "--to", "hf:alice/lumi-git", "--via", "git", "--private", env=env)
    assert r.returncode == 0, r.stderr
    assert '"private": true' in (hub.repo_dir("alice/lumi-git") / "fake-hub.json").read_text()
    assert hub.tree("alice/lumi-git")["model.safetensors"]["lfs"] is not None
    clone = tmp_path / "clone"
    with askpass_env(Credentials("alice", TOKEN, "test"), f"{hub.url}/alice/lumi-git.git") as extra:
        genv = {**env, **extra}
        subprocess.run(["git", "clone", "-q", f"{hub.url}/alice/lumi-git.git", str(clone)], env=genv, check=True)
        subprocess.run(["git", "lfs", "install", "--local"], cwd=clone, env=genv, check=True, capture_output=True)
        subprocess.run(["git", "lfs", "pull"], cwd=clone, env=genv, check=True, capture_output=True)
    got, want = dir_files(clone), dir_files(merged_model)
    assert {k: v for k, v in got.items() if k in want and k != "assistant.json"} == without_info(want)
    assert_public_info(got["assistant.json"], want["assistant.json"])
    assert ".gitattributes" in got and "README.md" in got
