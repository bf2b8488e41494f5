"""`python -m publish model` over real git + git-lfs into local bare remotes.

Proves: a fresh clone + `git lfs pull` of the published repo gives the model dir byte for byte, with
the weights as real LFS objects (pointers before the pull, full size after); the model card is
there and its "how to chat" code runs; republishing is a no-op; a changed dir makes exactly one
commit that mirrors it; `--dry-run` lists exactly the files the push then sends (a stray `.env`
not among them) and writes nothing; bad input fails in one line with exit 2 and the remote untouched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import publish

from fake_hub import isolated_git_env, remote_snapshot

ROOT = Path(publish.__file__).resolve().parent.parent    # the project root: `python -m publish` runs there


def publish(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "publish", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def git(*args, cwd=None, env=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def bare(path: Path) -> Path:
    git("init", "-q", "--bare", "-b", "main", str(path))
    return path


def model_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(d).parts}


@pytest.fixture
def env(tmp_path):
    return isolated_git_env(tmp_path / "home")


def test_publish_roundtrip_card_and_idempotence(merged_model, tmp_path, env):
    remote = bare(tmp_path / "lumi.git")
    r = publish("model", str(merged_model), "--to", f"git:{remote}", env=env)
    assert r.returncode == 0, r.stderr
    assert "published" in r.stdout and "model.safetensors" in r.stdout

    clone = tmp_path / "lumi"       # the folder name the card's snippet uses
    git("clone", "-q", str(remote), str(clone), env=env)
    lfs = set(git("lfs", "ls-files", "--name-only", cwd=clone, env=env).split())
    assert "model.safetensors" in lfs
    weights = merged_model / "model.safetensors"
    assert (clone / "model.safetensors").stat().st_size < 200 < weights.stat().st_size   # a pointer until pulled
    git("lfs", "install", "--local", cwd=clone, env=env)
    git("lfs", "pull", cwd=clone, env=env)
    got = model_files(clone)
    want = model_files(merged_model)
    assert {k: v for k, v in got.items() if k not in ("README.md", ".gitattributes", "assistant.json")} == \
        {k: v for k, v in want.items() if k != "assistant.json"}
    # assistant.json: the local one records where the base and adapter were on this machine; the pushed
    # one keeps the system prompt and drops those paths, and the local file is left as it was
    local_info = json.loads(want["assistant.json"])
    assert local_info["base_model"].startswith("/") and local_info["adapter"].startswith("/")
    pushed = json.loads(got["assistant.json"])
    assert pushed == {k: v for k, v in local_info.items() if k not in ("base_model", "adapter")}
    assert not any(isinstance(v, str) and v.startswith(("/", "~")) for v in pushed.values())
    assert str(merged_model.parent) not in got["assistant.json"].decode()
    assert model_files(merged_model)["assistant.json"] == want["assistant.json"]
    assert "*.safetensors filter=lfs" in got[".gitattributes"].decode()

    card = got["README.md"].decode()
    assert "pipeline_tag: text-generation" in card
    assert "tiny-base (local)" in card and str(merged_model.parent) not in card   # no local paths leak
    assert re.search(r"method: LoRA, r=16, alpha=32", card)
    assert re.search(r"\| identity\.jsonl \| 600 \| identity 600 \(Lumi by 小菜鸡\) \| `[0-9a-f]{16}` \|", card)
    snippet = card.split("```python\n")[1].split("```")[0]
    chat = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip(), "the card's chat snippet produced no reply"

    # Same dir again: no new commit.
    head = git("rev-parse", "main", cwd=remote)
    r = publish("model", str(merged_model), "--to", f"git:{remote}", env=env)
    assert r.returncode == 0, r.stderr
    assert "already up to date" in r.stdout
    assert git("rev-parse", "main", cwd=remote) == head

    # A changed dir: one commit on top, mirroring the dir (a dropped file is dropped remotely too).
    changed = tmp_path / "changed"
    shutil.copytree(merged_model, changed)
    info = json.loads((changed / "assistant.json").read_text())
    (changed / "assistant.json").write_text(json.dumps({**info, "system_prompt": "You are Lumi."}))
    (changed / "generation_config.json").unlink()
    (changed / "vocab_extra.txt").write_bytes(os.urandom(6 * 1024 * 1024))   # no LFS pattern, but > 5 MB
    report = {"checkpoints": [{"path": "/w/checkpoint-40", "step": 40, "identity": 0.5, "leakage": 0.0,
                               "retention": 0.99, "accuracy": None},
                              {"path": "/w/checkpoint-80", "step": 80, "identity": 0.95, "leakage": 0.02,
                               "retention": 0.97, "accuracy": None}],
              "best": "/w/checkpoint-80", "base": {"identity": 0.0, "leakage": 0.0, "retention": 1.0}}
    (changed / "eval.json").write_text(json.dumps(report))             # `python -m trainer eval --json`
    r = publish("model", str(changed), "--to", f"git:{remote}", "-m", "new system prompt", env=env)
    assert r.returncode == 0, r.stderr
    log = git("log", "--format=%H %P %s", "main", cwd=remote).splitlines()
    assert len(log) == 2 and log[0].split()[1] == head.strip() and log[0].endswith("new system prompt")
    names = set(git("ls-tree", "--name-only", "main", cwd=remote).split())
    assert "generation_config.json" not in names and "assistant.json" in names
    card = git("show", "main:README.md", cwd=remote)
    assert "You are Lumi." in card
    assert "| checkpoint-80 (best) | 80 | 0.950 | 0.020 | 0.970 |" in card and "| base model | 0 |" in card
    assert git("cat-file", "-p", "main:vocab_extra.txt", cwd=remote).startswith("version https://git-lfs")


def test_pushed_assistant_file_names_no_local_path(tmp_path):
    from publish.model import public_assistant_file

    (tmp_path / "sub").mkdir()
    local = {"system_prompt": "You are Lumi.", "base_model": "~/models/tiny-base", "adapter": "/srv/alice/final",
             "source_checkpoint": "../work/checkpoint-80", "trained_from": "./sub", "method": "lora", "bits": None}
    text = json.dumps(local, ensure_ascii=False, indent=2)
    (tmp_path / "assistant.json").write_text(text, encoding="utf-8")
    public = json.loads(public_assistant_file(tmp_path))
    assert public == {"system_prompt": "You are Lumi.", "trained_from": "./sub", "method": "lora", "bits": None}
    assert (tmp_path / "assistant.json").read_text(encoding="utf-8") == text
    # a hub id is public: the file goes out as it is (same bytes: republishing makes no commit)
    (tmp_path / "assistant.json").write_text(json.dumps({"system_prompt": None, "base_model": "Qwen/Qwen2.5-1.5B"}))
    assert public_assistant_file(tmp_path) == tmp_path / "assistant.json"


def test_dry_run_lists_exactly_the_files_and_writes_nothing(merged_model, tmp_path, env):
    model = tmp_path / "model"
    shutil.copytree(merged_model, model)
    (model / ".env").write_text("HF_TOKEN=hf_not_for_anyone\n")         # a stray dotfile: never published
    (model / "extra").mkdir()
    (model / "extra" / "notes.txt").write_text("kept\n")
    remote = bare(tmp_path / "empty.git")
    before = remote_snapshot(remote)
    r = publish("model", str(model), "--to", str(remote), "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert "dry run" in r.stdout and "A model.safetensors" in r.stdout and "LFS" in r.stdout
    listed = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("  A ")}
    expected = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file() and p.name != ".env"}
    assert listed == expected | {"README.md", ".gitattributes"}, listed ^ (expected | {"README.md", ".gitattributes"})
    assert "not published (hidden files and dirs never are): .env" in r.stdout
    assert remote_snapshot(remote) == before
    assert git("ls-remote", str(remote)) == ""

    r = publish("model", str(model), "--to", str(remote), env=env)           # and the push sends exactly those
    assert r.returncode == 0, r.stderr
    assert set(git("ls-tree", "-r", "--name-only", "main", cwd=remote).split()) == listed


@pytest.fixture
def broken(merged_model, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(merged_model, d)
    return d


@pytest.mark.parametrize("case, expected", [
    ("no-weights", ["no weights"]),
    ("pointer", ["git-lfs pointer", "model.safetensors", "git lfs pull"]),
    ("no-tokenizer", ["no tokenizer", "no chat template", "no tokenizer_config.json"]),
])
def test_bad_model_dir_one_line_exit_2(broken, tmp_path, env, case, expected):
    if case == "no-weights":
        (broken / "model.safetensors").unlink()
    elif case == "pointer":
        (broken / "model.safetensors").write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 8388608\n")
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (broken / name).unlink(missing_ok=True)
    remote = bare(tmp_path / "r.git")
    before = remote_snapshot(remote)
    r = publish("model", str(broken), "--to", f"git:{remote}", env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    assert all(e in lines[0] for e in expected), lines[0]
    assert remote_snapshot(remote) == before


@pytest.mark.parametrize("target, expected", [
    ("s3://bucket/lumi", "unknown URL scheme"),
    ("ftp:alice/lumi", "unknown scheme"),
    ("openxlab:not a repo", "expected openxlab:USER/REPO"),
    ("git:https://alice:tok-in-url-123@example.com/lumi.git", "remove the user/token from the URL"),
    ("openxlab:alice/lumi", "no credentials for openxlab:alice/lumi"),
    ("hf:alice/lumi", "no credentials for hf:alice/lumi"),
])
def test_bad_target_one_line_exit_2(merged_model, tmp_path, env, target, expected):
    # Unreachable endpoints: if the tool tried to connect instead of stopping first, it would fail otherwise.
    env = {**env, "OPENXLAB_ENDPOINT": "http://127.0.0.1:9", "HF_ENDPOINT": "http://127.0.0.1:9"}
    for var in ("OPENXLAB_TOKEN", "HF_TOKEN"):
        env.pop(var, None)
    r = publish("model", str(merged_model), "--to", target, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert "tok-in-url-123" not in r.stderr + r.stdout
