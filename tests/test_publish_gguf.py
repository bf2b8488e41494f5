"""`python -m publish model DIR --to git:... --gguf q8_0` over real git + git-lfs into a local bare remote:
the repo gets NAME-q8_0.gguf as a real LFS object (readable GGUF after `git lfs pull`) and the Ollama
Modelfile that points at it, the model card lists both, and no temp dir is left; a quant export-gguf
cannot write fails in one line with exit 2 and the remote untouched."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import publish as publish_pkg

from fake_hub import isolated_git_env, remote_snapshot

ROOT = Path(publish_pkg.__file__).resolve().parent.parent


def publish(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "publish", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def git(*args, cwd=None, env=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def setup(tmp_path):
    env = isolated_git_env(tmp_path / "home")
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")                 # where the export is staged: must end up empty
    remote = tmp_path / "lumi.git"
    git("init", "-q", "--bare", "-b", "main", str(remote))
    return env, remote


def test_publish_with_gguf_pushes_the_file_and_its_modelfile_through_lfs(tiny_base, tmp_path):
    import gguf

    env, remote = setup(tmp_path)
    r = publish("model", str(tiny_base), "--to", f"git:{remote}", "--gguf", "q8_0", env=env)
    assert r.returncode == 0, r.stderr
    assert "lumi-q8_0.gguf" in r.stdout and "published" in r.stdout
    assert list((tmp_path / "tmp").iterdir()) == []

    clone = tmp_path / "clone"
    git("clone", "-q", str(remote), str(clone), env=env)
    assert {"lumi-q8_0.gguf", "model.safetensors"} <= set(git("lfs", "ls-files", "--name-only", cwd=clone, env=env).split())
    assert (clone / "lumi-q8_0.gguf").stat().st_size < 200                # a pointer until pulled
    git("lfs", "install", "--local", cwd=clone, env=env)
    git("lfs", "pull", cwd=clone, env=env)
    reader = gguf.GGUFReader(str(clone / "lumi-q8_0.gguf"))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["general.architecture"].contents() == "llama"
    modelfile = (clone / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./lumi-q8_0.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    card = (clone / "README.md").read_text(encoding="utf-8")
    assert "- `lumi-q8_0.gguf`" in card and "- `Modelfile`" in card


def test_publish_with_a_quant_it_cannot_write_fails_before_pushing(tiny_base, tmp_path):
    env, remote = setup(tmp_path)
    before = remote_snapshot(remote)
    r = publish("model", str(tiny_base), "--to", f"git:{remote}", "--gguf", "q5_k", env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gguf q5_k:") and "f16, bf16, q8_0, q4_0" in lines[0], lines
    assert remote_snapshot(remote) == before and list((tmp_path / "tmp").iterdir()) == []
