"""Checkpoints on the tiny real model: sample chats at the set frequency, `save_total_limit`, atomic
checkpoints, `kill -9` then `--resume` matching an uninterrupted run, and the bad-input cases."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.engine import checkpoints
from trainer.__main__ import main as cli
from inference.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["你是谁", "Who are you?", "谁开发了你？"]
# 40 conversations, 8 per step: 5 steps an epoch, 3 epochs = 15 steps; resuming crosses epochs
RUN = ["--set", "epochs=3", "--set", "batch_size=8", "--set", "max_length=128", "--set", "logging_steps=1",
       "--set", "save_steps=4", "--set", "save_total_limit=2", "--set", "evaluation_freq=5",
       "--set", "evaluation_inputs=[你是谁]", "--set", "eval_max_new_tokens=8", "--set", "packing=false"]


@pytest.fixture(scope="module")
def small_data(identity_files, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckdata") / "identity40.jsonl"
    lines = Path(identity_files["train"]).read_text(encoding="utf-8").splitlines()[:40]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_args(tiny_base, data, work_dir, *extra) -> list[str]:
    return ["train", "tiny", "--model", str(tiny_base), "--data", str(data), "--work-dir", str(work_dir), *RUN, *extra]


@pytest.fixture(scope="module")
def reference(tiny_base, small_data, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    work = tmp_path_factory.mktemp("ckref") / "run"
    assert cli(train_args(tiny_base, small_data, work)) == 0
    return work


def scalars(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines()]


def greedy(base, adapter) -> list[list[int]]:
    from inference import load

    engine = load(base, adapter=adapter).engine()
    return [engine.greedy_ids([{"role": "user", "content": q}], max_new_tokens=16) for q in QUESTIONS]


def test_run_writes_sample_chats_logs_plot_and_keeps_the_newest_checkpoints(reference):
    evals = sorted(int(p.stem.rsplit("_", 1)[1]) for p in reference.glob("eval_outputs_step_*.txt"))
    assert evals == [0, 5, 10, 15]                                    # before, every 5 steps, end
    assert "Q: 你是谁\nA:" in (reference / "eval_outputs_step_10.txt").read_text(encoding="utf-8")
    assert [r["step"] for r in scalars(reference)] == list(range(1, 16))
    assert all({"loss", "lr", "tokens_per_s", "tokens", "peak_gib", "max_steps"} <= set(r) for r in scalars(reference))
    assert (reference / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = checkpoints.all_checkpoints(reference)
    assert [checkpoints.step_of(c) for c in kept] == [12, 15]         # save_total_limit 2, latest kept
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [*kept[-1].iterdir(), *(reference / "final").iterdir()]:  # no private 0600 weights
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    for ckpt in kept:
        marker = checkpoints.read_marker(ckpt)
        assert marker and {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                            "trainer_state.json", "assistant.json"} <= set(marker["files"])
    assert (reference / "final" / "adapter_model.safetensors").is_file()
    assert not (reference / "final" / "optimizer.pt").exists()


def test_kill_9_then_resume_matches_uninterrupted_run(tiny_base, small_data, reference, tmp_path):
    work = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *train_args(tiny_base, small_data, work)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not any(checkpoints.step_of(c) >= 8 for c in checkpoints.complete_checkpoints(work)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint-8 within 4 minutes"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "final").exists(), "killed too late: the run had already finished"

    assert cli(train_args(tiny_base, small_data, work, "--resume")) == 0
    got, want = scalars(work), scalars(reference)
    assert [r["step"] for r in got] == list(range(1, 16))              # no step logged twice
    assert abs(got[-1]["loss"] - want[-1]["loss"]) < 1e-3
    assert greedy(tiny_base, work / "final") == greedy(tiny_base, reference / "final")
    from safetensors.torch import load_file

    a, b = load_file(work / "final" / "adapter_model.safetensors"), load_file(reference / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_torn_checkpoints_are_never_resumed(reference, tmp_path):
    """What a kill while saving leaves: a dir without its marker, or with a file cut short."""
    work = tmp_path / "run"
    good = work / "checkpoint-12"
    shutil.copytree(reference / "checkpoint-12", good)
    unsealed = work / "checkpoint-14"
    shutil.copytree(reference / "checkpoint-15", unsealed)
    (unsealed / checkpoints.MARKER).unlink()
    torn = work / "checkpoint-15"
    shutil.copytree(reference / "checkpoint-15", torn)
    with open(torn / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    assert checkpoints.read_marker(torn) is None and checkpoints.read_marker(unsealed) is None
    assert checkpoints.find_resume(work, True) == good
    with pytest.raises(UserError, match="not a complete checkpoint.*newest complete one: .*checkpoint-12"):
        checkpoints.find_resume(work, str(torn))
    checkpoints.sweep_incomplete(work, echo=lambda s: None)
    assert checkpoints.all_checkpoints(work) == [good]


def error_of(capsys, argv) -> str:
    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_resume_bad_inputs(tiny_base, small_data, reference, tmp_path, capsys):
    empty = tmp_path / "empty"
    err = error_of(capsys, train_args(tiny_base, small_data, empty, "--resume"))
    assert "no complete checkpoint" in err

    # a checkpoint trained on another base model
    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2, "hidden_size": 64}))
    err = error_of(capsys, train_args(other, small_data, tmp_path / "x", "--resume", str(reference / "checkpoint-12")))
    assert "trained on another base model" in err and "num_hidden_layers 4 vs 2" in err

    # same base, other method settings: the saved optimizer state could not load
    err = error_of(capsys, train_args(tiny_base, small_data, tmp_path / "y", "--resume", str(reference / "checkpoint-12"),
                                      "--set", "lora_r=8"))
    assert "lora_r=16" in err

    # another lr: the checkpoint's optimizer and scheduler state would keep the old one, silently
    err = error_of(capsys, train_args(tiny_base, small_data, tmp_path / "z", "--resume", str(reference / "checkpoint-12"),
                                      "--set", "lr=1e-3"))
    assert "lr=" in err and "keeps the checkpoint's optimizer and lr schedule" in err

    # a fresh run into a work dir with checkpoints is a forgotten --resume, not a new run
    work = tmp_path / "again"
    shutil.copytree(reference / "checkpoint-12", work / "checkpoint-12")
    assert "add --resume" in error_of(capsys, train_args(tiny_base, small_data, work))
