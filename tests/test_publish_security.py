"""Tokens stay secret: with a unique fake token set, publish to an authenticated git server (the fake
hub's git-over-HTTPS with Basic auth, as OpenXLab does) and look for the token everywhere it could land.

Proves: the token is in none of: the server's stored repo (git objects, refs, config, LFS store), the
working clone publish pushed from (its .git/config, objects, LFS copies; kept here on purpose), a
fresh clone, the user's home (no credential helper stored it), stdout/stderr (even with git's curl
tracing on), or the one-line errors of a push the server rejects, a wrong token, an unreachable host.
A token is never sent over plain http:// to a non-local host (one line, exit 2, nothing contacted).
Only what a model needs is published: a stray `.env` (or any hidden file or dir) stays home and the
output says so; a symlink leading out of the model dir (a file or a dir) stops the run in one line
with the remote untouched.
"""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import types
import uuid
from pathlib import Path

import pytest

import publish

from fake_hub import FakeHub, isolated_git_env, remote_snapshot
from ports import refused_port

ROOT = Path(publish.__file__).resolve().parent.parent    # the project root: `python -m publish` runs there
TOKEN = f"oxt-{uuid.uuid4().hex}"


def all_bytes(path: Path) -> bytes:
    """Every file under `path`, plus git objects decompressed where `path` holds a repo."""
    parts = [p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()]
    for git_dir in [p for p in path.rglob("*") if p.is_dir() and (p / "objects").is_dir() and (p / "HEAD").is_file()]:
        parts.append(subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=git_dir,
                                    capture_output=True).stdout)
    return b"".join(parts)


@pytest.fixture
def hub(tmp_path):
    h = FakeHub(tmp_path / "hub", token=TOKEN, user="alice").start()
    h.create("alice/lumi", initial=False)          # OpenXLab: the repo is created empty on the website
    yield h
    h.stop()


def test_masker_hides_every_form():
    from publish.credentials import Credentials, Masker

    mask = Masker(Credentials("alice", "t/k+n=1234", "TEST"))
    basic = base64.b64encode(b"alice:t/k+n=1234").decode()
    text = mask(f"token t/k+n=1234, url t%2Fk%2Bn%3D1234, header Authorization: Basic {basic}")
    assert "1234" not in text and basic not in text and text.count("***") == 3


def test_token_never_lands_anywhere(merged_model, tmp_path, hub, monkeypatch, capfd):
    from publish import gitops
    from publish.__main__ import main

    home = tmp_path / "home"
    for k, v in isolated_git_env(home).items():
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith("GIT_") and k != "GIT_CONFIG_NOSYSTEM"]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("OPENXLAB_ENDPOINT", hub.url)
    monkeypatch.setenv("OPENXLAB_USER", "alice")
    monkeypatch.setenv("OPENXLAB_TOKEN", TOKEN)
    monkeypatch.setenv("GIT_CURL_VERBOSE", "1")          # a user debugging: curl prints its headers
    # A user whose git stores every credential it sees in ~/.git-credentials: publish must not feed it.
    subprocess.run(["git", "config", "--global", "credential.helper", "store"], check=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # Keep the working clone publish pushes from, to inspect its .git (it is normally deleted).
    monkeypatch.setattr(gitops, "shutil", types.SimpleNamespace(rmtree=lambda *a, **k: None, which=shutil.which))

    assert main(["model", str(merged_model), "--to", "openxlab:alice/lumi"]) == 0
    out = capfd.readouterr()
    assert "published" in out.out
    assert TOKEN not in out.out + out.err

    work = [p for p in scratch.iterdir() if p.name.startswith("publish-git-")]
    assert len(work) == 1 and (work[0] / ".git" / "lfs" / "objects").is_dir()
    assert f"{hub.url}/alice/lumi.git" in (work[0] / ".git" / "config").read_text()
    assert not any(p.name.startswith("publish-askpass-") for p in scratch.iterdir())   # script removed
    assert TOKEN.encode() not in all_bytes(work[0])
    assert TOKEN.encode() not in hub.raw_bytes("alice/lumi")
    assert hub.tree("alice/lumi")["model.safetensors"]["lfs"] is not None
    assert TOKEN.encode() not in all_bytes(home)

    from publish.credentials import Credentials, askpass_env

    clone = tmp_path / "fresh"
    with askpass_env(Credentials("alice", TOKEN, "test"), f"{hub.url}/alice/lumi.git") as extra:
        env = {**os.environ, **extra}
        subprocess.run(["git", "clone", "-q", f"{hub.url}/alice/lumi.git", str(clone)], env=env, check=True)
        subprocess.run(["git", "lfs", "install", "--local"], cwd=clone, env=env, check=True, capture_output=True)
        subprocess.run(["git", "lfs", "pull"], cwd=clone, env=env, check=True, capture_output=True)
    assert (clone / "model.safetensors").read_bytes() == (merged_model / "model.safetensors").read_bytes()
    assert TOKEN.encode() not in all_bytes(clone)


@pytest.mark.parametrize("case", ["rejected", "wrong-token", "unreachable"])
def test_failed_push_says_what_failed_without_token(merged_model, tmp_path, hub, case):
    env = {**isolated_git_env(tmp_path / "home"), "OPENXLAB_ENDPOINT": hub.url, "OPENXLAB_USER": "alice",
           "OPENXLAB_TOKEN": TOKEN, "GIT_CURL_VERBOSE": "1"}
    expected = {"rejected": "push to openxlab:alice/lumi failed", "wrong-token": "authentication failed",
                "unreachable": "cannot reach"}[case]
    if case == "rejected":
        hook = hub.repo_dir("alice/lumi") / "hooks" / "pre-receive"
        hook.write_text("#!/bin/sh\necho 'push refused by repository policy' >&2\nexit 1\n")
        hook.chmod(0o755)
    elif case == "wrong-token":
        env["OPENXLAB_TOKEN"] = TOKEN[::-1]
    with refused_port() as port:             # held here, never listening: nothing else can answer on it
        if case == "unreachable":
            env["OPENXLAB_ENDPOINT"] = f"http://127.0.0.1:{port}"
        r = subprocess.run([sys.executable, "-m", "publish", "model", str(merged_model), "--to",
                            "openxlab:alice/lumi"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stdout + r.stderr
    assert TOKEN not in r.stdout + r.stderr and TOKEN[::-1] not in r.stdout + r.stderr
    assert hub.head("alice/lumi") is None                    # no branch was created


def test_token_never_sent_over_plain_http(merged_model, tmp_path):
    env = {**isolated_git_env(tmp_path / "home"), "OPENXLAB_ENDPOINT": "http://models.example.invalid",
           "OPENXLAB_USER": "alice", "OPENXLAB_TOKEN": TOKEN, "GIT_TRACE": "1"}
    r = subprocess.run([sys.executable, "-m", "publish", "model", str(merged_model), "--to", "openxlab:alice/lumi"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "plain http:// to models.example.invalid" in lines[0], r.stdout + r.stderr
    assert "ls-remote" not in r.stdout + r.stderr            # refused before git was started (GIT_TRACE)
    assert TOKEN not in r.stdout + r.stderr


def bare(path: Path) -> Path:
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True)
    return path


def test_hidden_files_stay_home_and_links_out_are_refused(merged_model, tmp_path):
    env = isolated_git_env(tmp_path / "home")
    model = tmp_path / "lumi"
    shutil.copytree(merged_model, model)
    secret = f"sk-{uuid.uuid4().hex}"
    (model / ".env").write_text(f"OPENAI_API_KEY={secret}\n")
    (model / ".cache").mkdir()
    (model / ".cache" / "notes").write_text(secret)
    (model / "extra").mkdir()
    (model / "extra" / ".netrc").write_text(f"machine x password {secret}\n")
    (model / "extra" / "notes.txt").write_text("kept\n")
    remote = bare(tmp_path / "lumi.git")
    publish_cmd = [sys.executable, "-m", "publish", "model", str(model), "--to", f"git:{remote}"]
    r = subprocess.run(publish_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "not published (hidden files and dirs never are): .cache/, .env" in r.stdout
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", "main"], cwd=remote, capture_output=True,
                           text=True, check=True).stdout.split()
    assert "extra/notes.txt" in names and "model.safetensors" in names
    assert not [n for n in names if n != ".gitattributes" and any(p.startswith(".") for p in n.split("/"))]
    assert secret.encode() not in all_bytes(remote)

    outside = tmp_path / "outside"
    (outside / ".ssh").mkdir(parents=True)
    (outside / ".ssh" / "id_ed25519").write_text(f"PRIVATE KEY {secret}\n")
    for name, link_to in (("id_ed25519", outside / ".ssh" / "id_ed25519"), ("ssh", outside / ".ssh"),
                          ("extra/up", Path("../../outside/.ssh/id_ed25519"))):
        (model / name).symlink_to(link_to)
        before = remote_snapshot(remote)
        for args in ([], ["--dry-run"]):
            r = subprocess.run(publish_cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 2, r.stdout
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "symlink" in lines[0] and "outside" in lines[0] and name in lines[0], lines
            assert secret not in r.stdout + r.stderr
        assert remote_snapshot(remote) == before
        (model / name).unlink()
    (model / "tokenizer-link.json").symlink_to("tokenizer.json")        # a link that stays inside is fine
    r = subprocess.run(publish_cmd + ["--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "A tokenizer-link.json" in r.stdout, r.stderr
