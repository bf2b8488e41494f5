"""Several processes without a GPU: `python -m trainer train ... --cpu-procs 2` (trainer/engine/distributed.py).

The launcher runs the same command under `accelerate launch` as for `--gpus 2`, with the GPUs hidden,
so the two workers train on the CPU and talk over gloo (DDP for LoRA, FSDP2 for full fine-tuning).
These tests check what a several-GPU run must keep from a one-GPU run: one writer (rank 0), the same
losses for the same global batch, a final adapter / model that one process loads, merges and chats
with, and a resume on a different number of processes. The unit tests check the launch commands and
the DeepSpeed config the launcher writes (DeepSpeed itself runs on the GPU machine: bench/multi_gpu.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_distributed.py -x -q     # ~3 min on 2 cores
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.engine import checkpoints
from trainer.engine import distributed
from trainer.engine.config import TrainConfig
from inference.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# 4 rows a process x 2 processes = 4 rows x accum 2 on one: the same global batch of 8 (the launcher
# halves grad_accum). lora_dropout is 0 in the tiny preset, so both compute the same function.
COMMON = ["--set", "max_steps=4", "--set", "logging_steps=1", "--set", "batch_size=4", "--set", "grad_accum=2",
          "--set", "save_steps=2", "--set", "evaluation_inputs=[你是谁]", "--set", "eval_max_new_tokens=8",
          "--set", "evaluation_freq=0"]


def train_cli(argv: list[str]) -> int:
    from trainer.__main__ import main

    return main(["train", *argv])


def train_two_processes(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", *argv, "--cpu-procs", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def scalars(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines() if line.strip()]


def losses(work: Path) -> list[float]:
    return [r["loss"] for r in scalars(work)]


# ---- the launcher (no training) ----

def test_launch_flags_are_stripped_and_the_command_built(tmp_path):
    argv = ["tiny", "--gpus", "2", "--fsdp", "--deepspeed=zero2", "--set", "lr=1e-4", "--gpus=4", "--cpu-procs", "2"]
    assert distributed.strip_launch_flags(argv) == ["tiny", "--set", "lr=1e-4"]
    fsdp = distributed.launch_command(["tiny"], 2, fsdp=True, grad_accum=2, port=1234)
    assert fsdp[1:3] == ["-m", "accelerate.commands.launch"] and "--use_fsdp" in fsdp and "--multi_gpu" not in fsdp
    assert fsdp[fsdp.index("--fsdp_version") + 1] == "2"
    assert fsdp[-5:] == ["trainer", "train", "tiny", "--set", "grad_accum=2"]
    ddp = distributed.launch_command(["tiny"], 2)
    assert "--multi_gpu" in ddp and ddp[ddp.index("--num_processes") + 1] == "2"
    ds_file = distributed.write_deepspeed_config(tmp_path, "zero3")
    zero3 = distributed.launch_command(["tiny"], 2, deepspeed_file=ds_file)
    assert "--use_deepspeed" in zero3 and zero3[zero3.index("--deepspeed_config_file") + 1] == str(ds_file)
    assert "--zero_stage" not in zero3          # the file is the one source: accelerate refuses both


def test_launch_checks_and_keeps_the_global_batch(monkeypatch):
    qlora, full = TrainConfig(bits=4, batch_size=4, grad_accum=4), TrainConfig(method="full", batch_size=3, grad_accum=3)
    assert distributed.per_gpu_batch(qlora, 2)[:2] == (4, 2)          # fewer accumulation steps
    preset = TrainConfig(bits=4, batch_size=16, grad_accum=1)         # internlm2_chat_1_8b_qlora's 16 x 1
    assert distributed.per_gpu_batch(preset, 2)[:2] == (8, 1)         # a smaller micro-batch: still 16 rows
    batch, accum, note = distributed.per_gpu_batch(full, 2)
    assert (batch, accum) == (3, 3) and "global batch is 18 rows, not 9" in note   # neither divides: said so
    with pytest.raises(UserError, match="--gpus 2: no CUDA GPU is visible"):
        distributed.check_launch(full, 2, False, None, visible=0)
    with pytest.raises(UserError, match="only 1 CUDA GPU"):
        distributed.check_launch(full, 2, False, None, visible=1)
    with pytest.raises(UserError, match="--fsdp with bits 4"):        # what was typed wrong comes first
        distributed.check_launch(qlora, 1, True, None, visible=0)
    with pytest.raises(UserError, match="add --gpus N"):
        distributed.check_launch(full, 1, True, None, visible=2)
    with pytest.raises(UserError, match="--fsdp with bits 4"):
        distributed.check_launch(qlora, 2, True, None, visible=2)
    with pytest.raises(UserError, match="choose one"):
        distributed.check_launch(full, 2, False, None, visible=2, cpu_procs=2)
    with pytest.raises(UserError, match="must be >= 2"):
        distributed.check_launch(full, 1, False, None, visible=0, cpu_procs=1)
    distributed.check_launch(full, 1, True, None, visible=0, cpu_procs=2)    # no GPU needed for CPU processes
    with pytest.raises(UserError, match="fused_loss=false"):
        distributed.check_launch(TrainConfig(method="full", fused_loss=True), 2, False, "zero3", visible=2)
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="deepspeed is not installed"):
        distributed.check_launch(full, 2, False, "zero2", visible=2)


def test_maybe_launch_runs_workers_and_a_worker_trains(monkeypatch, tmp_path):
    qlora = TrainConfig(model=str(tmp_path / "base"), bits=4, batch_size=4, grad_accum=4, work_dir=str(tmp_path / "w"))
    ran = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus = types.SimpleNamespace(gpus=2, fsdp=False, deepspeed=None, cpu_procs=0)
    rc = distributed.maybe_launch(qlora, gpus, ["p", "--gpus", "2"], echo=lambda s: None,
                                  run=lambda cmd, **kw: ran.append((cmd, kw)) or 0)
    assert rc == 0 and ran[0][0][-6:] == ["train", "p", "--set", "batch_size=4", "--set", "grad_accum=2"]
    assert ran[0][1]["env"].get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")   # GPUs not hidden
    with pytest.raises(UserError, match="--gpus 0: must be >= 1"):
        distributed.maybe_launch(qlora, types.SimpleNamespace(gpus=0, fsdp=False, deepspeed=None, cpu_procs=0), ["p"])
    cpu = types.SimpleNamespace(gpus=1, fsdp=False, deepspeed=None, cpu_procs=2)
    distributed.maybe_launch(qlora, cpu, ["p", "--cpu-procs", "2"], echo=lambda s: None,
                             run=lambda cmd, **kw: ran.append((cmd, kw)) or 0)
    cmd, kw = ran[1]
    assert kw["env"]["CUDA_VISIBLE_DEVICES"] == "" and cmd[cmd.index("--num_processes") + 1] == "2"
    assert "--cpu-procs" not in cmd                      # workers do not launch again
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.maybe_launch(qlora, gpus, ["p"], run=lambda cmd, **kw: 1 / 0) is None


def test_the_launcher_picks_its_port_and_a_launch_that_never_started_is_retried(monkeypatch, tmp_path):
    """No port is picked and released here (another process could take it before the launcher binds):
    the launcher gets port 0 and picks its own; a launch that failed before any worker started (the
    window left there) is run again, a run whose workers started and then failed is not."""
    qlora = TrainConfig(model=str(tmp_path / "base"), bits=4, work_dir=str(tmp_path / "w"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus = types.SimpleNamespace(gpus=2, fsdp=False, deepspeed=None, cpu_procs=0)
    cmd = distributed.launch_command(["tiny"], 2)
    assert cmd[cmd.index("--main_process_port") + 1] == "0"

    def launcher(outcomes):
        calls = []

        def run(cmd, env):
            calls.append(cmd)
            worker_started, rc = outcomes[len(calls) - 1]
            if worker_started:         # what a worker does first: maybe_launch in the worker's process
                with pytest.MonkeyPatch.context() as mp:
                    for key, value in {**env, "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
                        mp.setenv(key, value)
                    mp.setattr(torch.cuda, "is_available", lambda: False)
                    assert distributed.maybe_launch(qlora, gpus, ["p"]) is None
            return rc
        return run, calls

    said = []
    run, calls = launcher([(False, 1), (True, 0)])          # EADDRINUSE in the launcher, then a good launch
    assert distributed.maybe_launch(qlora, gpus, ["p", "--gpus", "2"], echo=said.append, run=run) == 0
    assert len(calls) == 2 and "before any worker started" in said[-1]
    run, calls = launcher([(True, 3)])                      # the training itself failed: not run twice
    assert distributed.maybe_launch(qlora, gpus, ["p", "--gpus", "2"], echo=said.append, run=run) == 3
    assert len(calls) == 1
    run, calls = launcher([(False, 1)] * 5)                 # a launcher that never starts: given up on
    assert distributed.maybe_launch(qlora, gpus, ["p", "--gpus", "2"], echo=said.append, run=run) == 1
    assert len(calls) == distributed.LAUNCH_TRIES


def auto_paths(config: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= auto_paths(value, path + ".")
        elif value == "auto":
            out.add(path)
    return out


@pytest.mark.parametrize("stage", sorted(distributed.DEEPSPEED_STAGES))
def test_deepspeed_config_leaves_to_the_trainer_only_what_it_fills(stage, tmp_path):
    """The file the launcher writes: the ZeRO stage asked for, a whole 16-bit model saved under ZeRO-3,
    offload only for zero3_offload, and every "auto" one that transformers' Trainer fills at launch
    (read from the installed transformers' own filling code, so a renamed key fails here)."""
    import inspect
    import re

    from transformers.integrations import deepspeed as hf_ds

    written = json.loads(distributed.write_deepspeed_config(tmp_path, stage).read_text())
    zero = written["zero_optimization"]
    assert zero["stage"] == distributed.DEEPSPEED_STAGES[stage]
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (zero["stage"] == 3)
    offload = stage == "zero3_offload"
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
    assert ("optimizer" in written) == offload           # else the Trainer's own AdamW
    filled_by_trainer = set(re.findall(r'"([a-z0-9_.]+)"', inspect.getsource(hf_ds.HfTrainerDeepSpeedConfig)))
    autos = auto_paths(written)
    assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16.enabled"} <= autos
    assert autos <= filled_by_trainer, autos - filled_by_trainer
    if importlib.util.find_spec("deepspeed") is not None:     # where it is installed: the real filling too
        from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

        args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_grad_norm=0.7, use_cpu=True, report_to=[])
        filled = hf_ds.HfTrainerDeepSpeedConfig(json.loads(json.dumps(written)))
        try:
            filled.trainer_config_process(args)
            model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=100))
            filled.trainer_config_finalize(args, model, num_training_steps=10)
        finally:
            hf_ds.unset_hf_deepspeed_config()     # it registers itself globally (ZeRO-3 checks)
        assert not auto_paths(filled.config)
        assert filled.config["gradient_accumulation_steps"] == 2 and filled.config["gradient_clipping"] == 0.7


def test_cpu_procs_without_a_world_is_the_plain_command(tiny_base, identity_files, capsys):
    rc = train_cli(["tiny", "--model", str(tiny_base), "--data", str(identity_files["train"]), "--cpu-procs", "1"])
    assert rc == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --cpu-procs 1")


# ---- two CPU processes, end to end ----

@pytest.fixture(scope="module")
def two_and_one(tiny_base, identity_files, tmp_path_factory) -> dict:
    """The same LoRA job on 2 processes (DDP over gloo) and on 1, same global batch."""
    root = tmp_path_factory.mktemp("dist")
    base = ["tiny", "--model", str(tiny_base), "--data", str(identity_files["train"])]
    heldout = root / "heldout.jsonl"      # a few held-out questions: identity eval at every save, on 2 processes
    heldout.write_text("\n".join(identity_files["heldout"].read_text(encoding="utf-8").splitlines()[::4]) + "\n",
                       encoding="utf-8")
    evals = ["--set", "eval_identity=true", "--set", f"eval_data={heldout}"]
    two = train_two_processes([*base, "--work-dir", str(root / "two"), *COMMON, *evals])
    assert train_cli([*base, "--work-dir", str(root / "one"), *COMMON]) == 0
    return {"two": root / "two", "one": root / "one", "root": root, "base": base, "log": two.stdout}


def test_two_processes_write_once_and_match_one(two_and_one):
    two, one = two_and_one["two"], two_and_one["one"]
    assert "launching 2 processes (DDP on CPU processes, gloo)" in two_and_one["log"]
    assert two_and_one["log"].count("saved adapter to") == 1          # rank 1 prints nothing
    recs = scalars(two)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]                  # rank 0 alone writes the log
    assert losses(two) == pytest.approx(losses(one), rel=1e-3)        # same global batch, same losses
    # tokens/s counts both processes' tokens (logged as an exact integer): counting rank 0 alone would give
    # ~half. The windows are not row-for-row the same: each dataloader collates one micro-batch ahead, which
    # is half a step on 1 process (2 micro-batches per step) and a whole step on 2, so the windows differ by the
    # length of the micro-batches at their edges (measured 1.00x-1.10x, depending on the data's row lengths); 20%
    # still tells both ranks (~1x) from rank 0 alone (~0.5x).
    two_tokens, one_tokens = [r["tokens"] for r in recs], [r["tokens"] for r in scalars(one)]
    assert two_tokens[-1] - two_tokens[0] == pytest.approx(one_tokens[-1] - one_tokens[0], rel=0.2)
    assert sorted(p.name for p in two.glob("eval_outputs_step_*.txt")) == ["eval_outputs_step_0.txt",
                                                                             "eval_outputs_step_4.txt"]
    assert [p.name for p in checkpoints.complete_checkpoints(two)] == ["checkpoint-2", "checkpoint-4"]
    assert not list(two.glob(".*tmp*")), "a half-written file was left behind"
    # identity eval: every rank scores, rank 0 alone reports and keeps best/
    report = json.loads((two / "eval_report.json").read_text(encoding="utf-8"))
    assert [r["step"] for r in report["checkpoints"]] == [2, 4]
    assert two_and_one["log"].count("identity eval at step") == 2
    assert (two / "best" / "adapter_config.json").is_file()


def test_two_process_adapter_is_a_plain_adapter_that_merges_and_chats(two_and_one, tiny_base, tmp_path):
    from inference.loader import load
    from trainer.export.merge import merge

    two, one = two_and_one["two"] / "final", two_and_one["one"] / "final"
    w2, w1 = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert sorted(w2) == sorted(w1) and not any("module." in k for k in w2)   # no DDP wrapper in the names
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-3, atol=1e-4)
    merged = merge(tiny_base, two, tmp_path / "merged")
    question = [{"role": "user", "content": "你是谁"}]
    with_adapter = load(tiny_base, adapter=two, device="cpu").engine().chat(question, max_new_tokens=12)
    answer = load(merged, device="cpu").engine().chat(question, max_new_tokens=12)
    assert answer and answer == with_adapter


def test_resume_two_process_checkpoint_on_one_process(two_and_one):
    two, root = two_and_one["two"], two_and_one["root"]
    work = root / "resumed"
    work.mkdir()
    shutil.copytree(two / "checkpoint-2", work / "checkpoint-2")
    for name in ("scalars.jsonl", "config.yaml"):
        shutil.copy(two / name, work / name)
    assert sorted(p.name for p in (work / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert train_cli([*two_and_one["base"], "--work-dir", str(work), *COMMON, "--resume"]) == 0
    assert [r["step"] for r in scalars(work)] == [1, 2, 3, 4]          # steps 3-4 again, once each
    assert losses(work)[2:] == pytest.approx(losses(two)[2:], rel=1e-3)  # and the same as on 2 processes
    assert (work / "final" / "adapter_model.safetensors").is_file()


def test_fsdp_full_fine_tuning_on_two_processes_saves_one_model(tiny_base, identity_files, tmp_path):
    """FSDP2 full fine-tuning, with a sample chat at step 0 (generation in between training steps
    once broke FSDP2 with inference-mode tensors); the saved model is whole and equals one process's."""
    from transformers import AutoModelForCausalLM

    base = ["tiny", "--model", str(tiny_base), "--data", str(identity_files["train"]), "--set", "method=full",
            *COMMON, "--set", "max_steps=2", "--set", "save_steps=0"]
    heldout = tmp_path / "heldout.jsonl"   # identity eval at the end: generation and scoring inside FSDP2 training
    heldout.write_text("\n".join(identity_files["heldout"].read_text(encoding="utf-8").splitlines()[::6]) + "\n",
                       encoding="utf-8")
    evals = ["--set", "save_steps=1", "--set", "eval_identity=true", "--set", f"eval_data={heldout}"]
    log = train_two_processes([*base, "--work-dir", str(tmp_path / "two"), "--fsdp", *evals]).stdout
    assert "FSDP2 on CPU processes" in log and "sample chats at step 0" in log
    assert log.count("identity eval at step") == 2      # scored after step 1, then trained on under FSDP2
    assert train_cli([*base, "--work-dir", str(tmp_path / "one")]) == 0
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-3)
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    assert sorted(two) == sorted(one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)
    # FSDP2's checkpoint (full state dict, optimizer included) resumes on one process: step 2 again
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-1", resumed / "checkpoint-1")
    for name in ("scalars.jsonl", "config.yaml"):
        shutil.copy(tmp_path / "two" / name, resumed / name)
    assert train_cli([*base, "--work-dir", str(resumed), "--resume"]) == 0
    assert [r["step"] for r in scalars(resumed)] == [1, 2]
    assert losses(resumed) == pytest.approx(losses(tmp_path / "two"), rel=1e-3)
    again = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    for key in two:
        torch.testing.assert_close(again[key], two[key], rtol=1e-3, atol=1e-4)


def test_an_interrupted_launch_passes_sigterm_on(tmp_path):
    """Ctrl-C / SIGTERM in `train --gpus N` reaches the launcher as SIGTERM (its workers clean up),
    not as SIGKILL, which would orphan the workers on the GPUs."""
    import signal
    import threading

    ready, got = tmp_path / "ready", tmp_path / "got"
    child = ("import pathlib, signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(got)!r}).write_text('TERM'), sys.exit(0)))\n"
             f"pathlib.Path({str(ready)!r}).write_text('1')\n"
             "time.sleep(60)\n")

    def interrupt_when_ready():
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)      # a real signal: it interrupts the launcher's wait()

    # a shell that starts the suite in the background (`cmd &`) hands it SIGINT ignored, and Python keeps
    # it so: install Python's own handler, as an interactive run has it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_when_ready, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            distributed.run_launcher([sys.executable, "-c", child], grace=30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert got.read_text() == "TERM"
