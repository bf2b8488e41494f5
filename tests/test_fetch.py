"""inference/fetch.py: clone + LFS pull once, resume a killed fetch, hand the token to git safely.

Proves: MODEL_REPO forms resolve (OpenXLab URL, Hugging Face id and page URL, credentials in a URL
stripped); a fetch from a local bare repo with the tiny merged model in LFS yields real weights and a
second fetch runs no git command at all (the remote may even be gone); a fetch killed during
`git lfs pull` is resumed, and a clone cut before its first commit is removed and redone; LFS
objects missing on the remote give a clear error and no completion marker; against a local smart
HTTP server that demands Basic auth the token reaches git only through GIT_ASKPASS -- never in a git
command line, `.git/`, the log or a configured credential store -- and without it the error names
MODEL_REPO_TOKEN instead of hanging on a prompt. Credentials are scoped (inference/credentials.py): a
repo whose `.lfsconfig` sends LFS to a second server never hands that server the token (its log of
Authorization headers is empty), and the fetch then either succeeds without it or fails in one line
naming the other host; a token over plain http:// to a non-local host is refused before any network;
every URL follows `--`. A later start asks the remote for its HEAD (`git ls-remote`, nothing else)
and updates a cached clone the remote moved past, LFS weights included.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from fake_hub import FakeHub
from inference.fetch import MARKER, fetch, parse_source, slug
from inference.loader import check_model_dir
from inference.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
GIT = shutil.which("git")


def git(*args, cwd=None, env=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def make_model_repo(model_dir: Path, bare: Path, *, skip=(), push_lfs_objects: bool = True) -> Path:
    """A bare repo (HEAD on main) holding `model_dir` with weights and tokenizer model in git-lfs."""
    git("init", "-q", "--bare", "-b", "main", str(bare))
    work = bare.with_name(bare.name + "-work")
    git("init", "-q", "-b", "main", str(work))
    git("lfs", "install", "--local", cwd=work)
    git("lfs", "track", "*.safetensors", "*.bin", "*.model", cwd=work)
    for f in Path(model_dir).iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy2(f, work / f.name)
    git("add", "-A", cwd=work)
    git("-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "model", cwd=work)
    git("remote", "add", "origin", str(bare), cwd=work)
    env = {**os.environ, **({} if push_lfs_objects else {"GIT_LFS_SKIP_PUSH": "1"})}
    git("push", "-q", "origin", "main", cwd=work, env=env)
    shutil.rmtree(work)
    return bare


@pytest.fixture(scope="module")
def model_repo(merged_model, tmp_path_factory) -> Path:
    return make_model_repo(merged_model, tmp_path_factory.mktemp("remote") / "lumi.git")


@pytest.fixture
def git_home(tmp_path, monkeypatch) -> Path:
    """git sees a fresh HOME with a `store` credential helper: had anything handed the token to the
    configured helpers, it would land in ~/.git-credentials."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[credential]\n\thelper = store\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    return home


def argv_logging_git(tmp_path, monkeypatch) -> Path:
    """Put a `git` first on PATH that records every command line it is given (git-lfs's calls too)."""
    shim, log = tmp_path / "shim", tmp_path / "git-argv.log"
    shim.mkdir()
    (shim / "git").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\nexec {GIT} "$@"\n')
    (shim / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
    log.touch()
    return log


def test_model_repo_forms(tmp_path):
    assert parse_source("https://code.openxlab.org.cn/alice/lumi.git") == (
        "https://code.openxlab.org.cn/alice/lumi.git", "alice", None)
    assert parse_source("alice/lumi") == ("https://huggingface.co/alice/lumi", "alice", None)
    assert parse_source("https://huggingface.co/alice/lumi/tree/main")[0] == "https://huggingface.co/alice/lumi"
    assert parse_source("https://bob:s3cret@code.openxlab.org.cn/alice/lumi.git") == (
        "https://code.openxlab.org.cn/alice/lumi.git", "bob", "s3cret")
    assert parse_source("git@github.com:alice/lumi.git")[0] == "git@github.com:alice/lumi.git"
    assert parse_source("/no/such/dir/model")[0] == "/no/such/dir/model"      # a path, checked when fetched
    for bad in ("", "not a repo at all"):
        with pytest.raises(UserError, match="MODEL_REPO"):
            parse_source(bad)
    with pytest.raises(UserError, match="no such directory"):
        fetch("/no/such/dir/model", cache_dir=tmp_path)
    a, b = slug("https://huggingface.co/alice/lumi"), slug("https://huggingface.co/alice/lumi2")
    assert a != b and "alice-lumi" in a and "/" not in a


def test_fetch_once_then_only_ls_remote(model_repo, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "own_assistant.fetch")
    argv_log = argv_logging_git(tmp_path, monkeypatch)
    target = fetch(str(model_repo), cache_dir=tmp_path / "cache")
    check_model_dir(target)                                   # real weights, no LFS pointer left
    calls = argv_log.read_text()
    assert f"clone --progress -- {model_repo.resolve()} " in calls and "lfs pull" in calls   # `--` before the URL
    assert "git clone" in caplog.text and "git lfs pull" in caplog.text and "fetched commit" in caplog.text

    argv_log.write_text("")                  # an unchanged remote: one cheap question, no download
    assert fetch(str(model_repo), cache_dir=tmp_path / "cache") == target
    assert argv_log.read_text().splitlines() == [f"ls-remote -- {model_repo.resolve()} HEAD"]

    moved = model_repo.rename(model_repo.with_name("gone.git"))    # an unreachable remote keeps the cache
    try:
        argv_log.write_text("")
        assert fetch(str(model_repo), cache_dir=tmp_path / "cache") == target
        assert [c.split()[0] for c in argv_log.read_text().splitlines()] == ["ls-remote"]
        assert "the remote did not answer" in caplog.text
    finally:
        moved.rename(model_repo)


def test_killed_fetch_is_resumed_and_broken_clone_redone(model_repo, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "own_assistant.fetch")
    cache, started = tmp_path / "cache", tmp_path / "lfs-started"
    # A git-lfs that hangs in `pull`: the fetch is then killed (with its whole process group, as a
    # stopped container would be) after the clone and in the middle of the LFS download.
    shim = tmp_path / "hang"
    shim.mkdir()
    (shim / "git-lfs").write_text(f'#!/bin/sh\n[ "$1" = pull ] && touch "{started}" && sleep 300\n'
                                  f'exec {shutil.which("git-lfs")} "$@"\n')
    (shim / "git-lfs").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "inference.fetch", str(model_repo), "--cache", str(cache)],
                            env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert started.exists(), proc.stdout.read().decode() if proc.poll() is not None else "lfs pull never began"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    target = cache / slug(str(model_repo.resolve()))
    assert (target / ".git").is_dir() and not (target / ".git" / MARKER).exists()
    with pytest.raises(UserError, match="git-lfs pointer"):
        check_model_dir(target)                              # what the killed start left behind

    assert fetch(str(model_repo), cache_dir=cache) == target
    assert "resuming an interrupted fetch" in caplog.text
    check_model_dir(target)
    assert (target / ".git" / MARKER).is_file()

    # A clone killed before it had a commit: not resumable, so it is removed and cloned again.
    broken = tmp_path / "cache2" / slug(str(model_repo.resolve()))
    broken.mkdir(parents=True)
    git("init", "-q", str(broken))
    (broken / "config.json").write_text("{")
    assert fetch(str(model_repo), cache_dir=tmp_path / "cache2") == broken
    assert "removing an unusable half-finished clone" in caplog.text
    check_model_dir(broken)


def test_lfs_objects_missing_on_remote(merged_model, tmp_path):
    repo = make_model_repo(merged_model, tmp_path / "nolfs.git", push_lfs_objects=False)
    with pytest.raises(UserError, match=r"git lfs pull failed: .*missing from the remote's LFS storage"):
        fetch(str(repo), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob(f"*/.git/{MARKER}"))


class GitHttp:
    """git's smart HTTP protocol (`git http-backend`) on loopback, behind HTTP Basic auth."""

    def __init__(self, root: Path, user: str, token: str):
        self.root, self.user = root, user
        self.auth = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()

    def __call__(self, environ, start_response):
        if environ.get("HTTP_AUTHORIZATION") != self.auth:
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="models"')])
            return [b""]
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        cgi = {"GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1", "PATH": os.environ["PATH"],
               "REQUEST_METHOD": environ["REQUEST_METHOD"], "PATH_INFO": environ["PATH_INFO"],
               "QUERY_STRING": environ.get("QUERY_STRING", ""), "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": self.user, "REMOTE_ADDR": "127.0.0.1",
               "HTTP_CONTENT_ENCODING": environ.get("HTTP_CONTENT_ENCODING", ""),
               "GIT_PROTOCOL": environ.get("HTTP_GIT_PROTOCOL", "")}
        out = subprocess.run([GIT, "http-backend"], input=body, env=cgi, capture_output=True, check=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = "200 OK", []
        for line in head.decode().split("\r\n"):
            key, _, value = line.partition(": ")
            if key.lower() == "status":
                status = value
            elif key:
                headers.append((key, value))
        start_response(status, headers)
        return [payload]


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_token_only_through_askpass(tmp_path, git_home, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "own_assistant.fetch")
    token = "tok-" + base64.b16encode(os.urandom(8)).decode()
    served = tmp_path / "srv"
    work = tmp_path / "w"
    git("init", "-q", "-b", "main", str(work))
    (work / "config.json").write_text("{}")
    git("add", "-A", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "-m", "m", cwd=work)
    served.mkdir()
    git("clone", "-q", "--bare", str(work), str(served / "alice" / "lumi.git"))

    server = make_server("127.0.0.1", 0, GitHttp(served, "alice", token), WSGIServer, Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/alice/lumi.git"
    argv_log = argv_logging_git(tmp_path, monkeypatch)
    try:
        with pytest.raises(UserError, match="MODEL_REPO_TOKEN"):
            fetch(url, cache_dir=tmp_path / "c0")             # no token: a clear error, not a prompt
        target = fetch(url, token=token, cache_dir=tmp_path / "c1")
        assert (target / "config.json").read_text() == "{}"
        # the token may also arrive inside the URL: it is taken out before git ever sees the URL
        inline = f"http://alice:{token}@127.0.0.1:{server.server_port}/alice/lumi.git"
        target2 = fetch(inline, cache_dir=tmp_path / "c2")
        assert git("config", "--get", "remote.origin.url", cwd=target2).strip() == url
    finally:
        server.shutdown()
    assert argv_log.read_text().count("clone") >= 3
    assert token not in argv_log.read_text()
    assert token not in caplog.text
    for clone in (target, target2):
        for f in (clone / ".git").rglob("*"):
            assert not f.is_file() or token.encode() not in f.read_bytes(), f
    assert not (git_home / ".git-credentials").exists()


def small_lfs_repo(bare: Path, files: dict[str, bytes]) -> Path:
    """A bare repo on main whose *.safetensors go through git-lfs; `push_files` adds commits to it."""
    git("init", "-q", "--bare", "-b", "main", str(bare))
    return push_files(bare, files)


def push_files(bare: Path, files: dict[str, bytes]) -> Path:
    work = bare.with_name(bare.name + "-work")
    if work.exists():
        shutil.rmtree(work)
    git("clone", "-q", str(bare), str(work))
    git("checkout", "-q", "-B", "main", cwd=work)
    git("lfs", "install", "--local", cwd=work)
    git("lfs", "track", "*.safetensors", cwd=work)
    for name, data in files.items():
        (work / name).write_bytes(data)
    git("add", "-A", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "-m", "publish", cwd=work)
    git("push", "-q", "origin", "main", cwd=work)
    shutil.rmtree(work)
    return bare


def test_cached_clone_follows_a_new_publish(tmp_path, monkeypatch, caplog):
    """The Space restarts with its cache kept: a model published since then is what it serves."""
    caplog.set_level(logging.INFO, "own_assistant.fetch")
    old, new = os.urandom(3000), os.urandom(5000)
    remote = small_lfs_repo(tmp_path / "lumi.git", {"config.json": b'{"v": 1}', "model.safetensors": old})
    target = fetch(str(remote), cache_dir=tmp_path / "cache")
    assert (target / "model.safetensors").read_bytes() == old

    push_files(remote, {"config.json": b'{"v": 2}', "model.safetensors": new})
    head = git("rev-parse", "main", cwd=remote).strip()
    assert fetch(str(remote), cache_dir=tmp_path / "cache") == target
    assert (target / "config.json").read_bytes() == b'{"v": 2}'
    assert (target / "model.safetensors").read_bytes() == new             # the new LFS object, pulled
    assert git("rev-parse", "HEAD", cwd=target).strip() == head
    assert f"the remote moved to {head[:12]}" in caplog.text
    assert f'"commit": "{head}"' in (target / ".git" / MARKER).read_text()

    argv_log = argv_logging_git(tmp_path, monkeypatch)         # and now it is current: nothing more to do
    assert fetch(str(remote), cache_dir=tmp_path / "cache") == target
    assert [c.split()[0] for c in argv_log.read_text().splitlines()] == ["ls-remote"]


def test_token_over_plain_http_refused_and_urls_never_options(tmp_path, monkeypatch):
    argv_log = argv_logging_git(tmp_path, monkeypatch)
    for url in ("http://models.example.com/alice/lumi.git", "http://bob:tok-in-url-123@models.example.com/a/b.git"):
        with pytest.raises(UserError, match=r"plain http:// to models\.example\.com .* use https://") as err:
            fetch(url, token=None if "@" in url else "tok-123456", cache_dir=tmp_path / "c")
        assert "tok-" not in str(err.value) and "\n" not in str(err.value)
    assert argv_log.read_text() == ""                        # refused before any git process
    r = subprocess.run([sys.executable, "-m", "inference.fetch", "http://models.example.com/alice/lumi.git",
                        "--cache", str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "MODEL_REPO_TOKEN": "tok-123456", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "plain http://" in r.stderr, r.stderr
    # loopback is fine without TLS (a local test server or proxy): refused only later, by the server
    with pytest.raises(UserError, match="git clone failed"):
        fetch("http://127.0.0.1:9/alice/lumi.git", token="tok-123456", cache_dir=tmp_path / "c")

    # A MODEL_REPO that reads like an option: never an option to git (`--upload-pack` would run a command)
    pwned = tmp_path / "pwned"
    with pytest.raises(UserError, match="starts with '-'"):
        fetch(f"--upload-pack=touch {pwned};false ://x", cache_dir=tmp_path / "c")
    assert not pwned.exists()


@pytest.mark.parametrize("lfs_server", ["open", "asks-for-a-login"])
def test_lfs_on_another_host_never_gets_the_token(tmp_path, git_home, monkeypatch, caplog, lfs_server):
    """The repo's .lfsconfig sends LFS to a second server: only the repo's own host may get the token."""
    caplog.set_level(logging.INFO, "own_assistant.fetch")
    token = "tok-" + base64.b16encode(os.urandom(8)).decode()
    repo_host = FakeHub(tmp_path / "a", token=token, user="alice").start()
    lfs_host = FakeHub(tmp_path / "b")
    lfs_host.any_login = lfs_server != "open"        # 401 without a login, and any login will do: it harvests
    lfs_host.start()
    try:
        weights = os.urandom(4000)
        oid = hashlib.sha256(weights).hexdigest()
        lfs_host.create("alice/lumi", initial=False)
        (lfs_host.lfs_dir("alice/lumi") / oid).write_bytes(weights)
        repo_host.create("alice/lumi", initial=False)
        repo_host.commit("alice/lumi", "model", [
            ("file", ".gitattributes", b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"),
            ("file", ".lfsconfig", f"[lfs]\n\turl = {lfs_host.url}/alice/lumi.git/info/lfs\n".encode()),
            ("file", "config.json", b"{}"), ("lfs", "model.safetensors", oid, len(weights))], "model")
        url = f"{repo_host.url}/alice/lumi.git"
        if lfs_server == "open":
            target = fetch(url, token=token, cache_dir=tmp_path / "cache")
            assert (target / "model.safetensors").read_bytes() == weights
        else:
            with pytest.raises(UserError) as err:
                fetch(url, token=token, cache_dir=tmp_path / "cache")
            line = str(err.value)
            assert "\n" not in line and "git lfs pull failed" in line and ".lfsconfig" in line, line
            assert lfs_host.url.split("//")[1] in line and token not in line
    finally:
        repo_host.stop()
        lfs_host.stop()
    basic = "Basic " + base64.b64encode(f"alice:{token}".encode()).decode()
    assert basic in repo_host.authorizations                   # the repo's own host did get it
    assert any("/info/lfs/objects/batch" in p for _, p in lfs_host.requests)   # LFS really went there ...
    assert lfs_host.authorizations and not any(lfs_host.authorizations)        # ... with no Authorization
    assert token not in caplog.text


def test_hub_id_goes_through_the_hub_api(tmp_path, monkeypatch, caplog):
    """USER/REPO: snapshot_download with the token for the Hub only; no git; a new commit is followed."""
    import huggingface_hub.constants

    caplog.set_level(logging.INFO, "own_assistant.fetch")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)    # the "Hub" is on loopback
    token = "hf_" + base64.b16encode(os.urandom(8)).decode()
    hub = FakeHub(tmp_path / "hub", token=token).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    argv_log = argv_logging_git(tmp_path, monkeypatch)
    try:
        weights = os.urandom(3000)
        oid = hashlib.sha256(weights).hexdigest()
        hub.create("alice/lumi")
        (hub.lfs_dir("alice/lumi") / oid).write_bytes(weights)
        hub.commit("alice/lumi", "model", [("file", "config.json", b'{"v": 1}'),
                                           ("lfs", "model.safetensors", oid, len(weights))], "model")
        with pytest.raises(UserError, match="MODEL_REPO_TOKEN") as err:
            fetch("alice/lumi", cache_dir=tmp_path / "cache")                 # private: no token, one line
        assert "\n" not in str(err.value)
        target = fetch("alice/lumi", token=token, cache_dir=tmp_path / "cache")
        assert (target / "model.safetensors").read_bytes() == weights
        assert (target / "config.json").read_bytes() == b'{"v": 1}'

        hub.requests.clear()
        assert fetch("alice/lumi", token=token, cache_dir=tmp_path / "cache") == target
        assert hub.requests == [("GET", "/api/models/alice/lumi")]             # one question, no download

        hub.commit("alice/lumi", "model", [("file", "config.json", b'{"v": 2}')], "new config")
        assert fetch("alice/lumi", token=token, cache_dir=tmp_path / "cache") == target
        assert (target / "config.json").read_bytes() == b'{"v": 2}'
    finally:
        hub.stop()
    client_git = [c for c in argv_log.read_text().splitlines() if c.split()[0] in ("clone", "ls-remote", "lfs")]
    assert client_git == []                                # no git on our side (the fake hub runs its own)
    assert set(hub.authorizations) == {"", f"Bearer {token}"}      # "": the call made without a token
    assert token not in caplog.text
