"""The same `train` command on several GPUs: DDP, FSDP2 or DeepSpeed ZeRO, through `accelerate launch`.

    python -m trainer train PRESET --data D.jsonl --gpus 2                    # DDP (LoRA / QLoRA)
    python -m trainer train PRESET --data D.jsonl --gpus 2 --fsdp             # FSDP2, full shard (full FT)
    python -m trainer train PRESET --data D.jsonl --gpus 2 --deepspeed zero2  # needs `pip install deepspeed`
    python -m trainer train tiny --data D.jsonl --cpu-procs 2                 # tests only: 2 CPU processes (gloo)

`--gpus N` re-runs this same command once per GPU under `accelerate launch` (which sets RANK,
LOCAL_RANK, WORLD_SIZE and, for --fsdp / --deepspeed, its ACCELERATE_* settings); transformers'
Trainer then wraps the model in DDP, FSDP2 or DeepSpeed from that environment. Presets, logs, sample
chats and checkpoints are the single-GPU ones; rank 0 writes the files. The global batch of the
preset is kept: `grad_accum` is divided by N when it divides evenly, else `batch_size` when it does.

`--deepspeed STAGE` writes `WORK_DIR/deepspeed_STAGE.json` (`deepspeed_config`: ZeRO settings, with
batch sizes, accumulation, clipping, precision and optimizer values "auto" so the Trainer fills them
from the preset) and hands it to accelerate as `--deepspeed_config_file`. ZeRO-3 gathers 16-bit
weights at save time, so `final/` is one ordinary checkpoint that loads on one GPU or the CPU.

`--cpu-procs N` is for tests only: N processes on the CPU, talking over gloo, so CI (no GPU)
exercises the same launch, rank-0 writing and checkpoint path. It is slower than one process.

LoRA / QLoRA use DDP: the frozen base is replicated (1 GB for a 1.8B model in nf4) and only the
adapter's gradients are all-reduced. FSDP shards weights, gradients and optimizer state, which is what
full fine-tuning of a model too big for one GPU needs; it is refused with bits 4/8 because
bitsandbytes' packed 4-bit weights cannot be flattened and sharded as they are loaded here.

Several machines (not tested here): run accelerate's launcher on every node with the train command,
    accelerate launch --num_machines 2 --machine_rank R --main_process_ip HOST --main_process_port 29500 \\
        --num_processes 16 --multi_gpu -m trainer train PRESET --data D.jsonl
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from inference import atomic
from inference.errors import UserError

DEEPSPEED_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
LAUNCH_FLAGS = ("--gpus", "--fsdp", "--deepspeed", "--cpu-procs")
# The launcher's rendezvous port is picked by accelerate in the launcher itself (port 0), not here: a port
# picked and released here could be taken before the launcher binds it. The window left there is closed
# by launching again when the launcher failed before any worker started (each worker touches this file).
STARTED_FILE = "OWN_ASSISTANT_WORKER_STARTED"
LAUNCH_TRIES = 3


def add_arguments(parser) -> None:
    """The flags `python -m trainer train` takes for several GPUs."""
    parser.add_argument("--gpus", type=int, default=1, help="GPUs on this machine to train on (default 1)")
    parser.add_argument("--fsdp", action="store_true", help="with --gpus N: shard with FSDP2 (full fine-tuning)")
    parser.add_argument("--deepspeed", choices=sorted(DEEPSPEED_STAGES),
                        help="with --gpus N: DeepSpeed ZeRO stage instead of DDP (needs deepspeed installed)")
    parser.add_argument("--cpu-procs", type=int, default=0, metavar="N",
                        help="tests only: N CPU processes over gloo instead of GPUs (no GPU needed; slow)")


def is_worker() -> bool:
    """True inside a process that a launcher started (one of N)."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def strip_launch_flags(argv: list[str]) -> list[str]:
    """The train argv without --gpus/--fsdp/--deepspeed (and their values): what each worker runs."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = name != "--fsdp" and "=" not in arg
            continue
        out.append(arg)
    return out


def deepspeed_config(stage: str) -> dict:
    """The DeepSpeed config for a ZeRO stage. "auto" values are filled by transformers' Trainer from
    its own arguments (batch size, accumulation, clipping, bf16/fp16, learning rate), so the preset
    stays the one source of the hyperparameters."""
    zero = {"stage": DEEPSPEED_STAGES[stage], "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": "auto"}
    if zero["stage"] == 3:
        # the saved final/ must be one ordinary 16-bit checkpoint, not N shards only DeepSpeed reads
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": zero,
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if stage == "zero3_offload":
        zero.update(offload_optimizer={"device": "cpu", "pin_memory": True},
                    offload_param={"device": "cpu", "pin_memory": True})
        # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's own CPU Adam (compiled just in
        # time with ninja), which it insists on; without offload the Trainer's torch AdamW is used.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return config


def write_deepspeed_config(work_dir, stage: str) -> Path:
    path = Path(work_dir) / f"deepspeed_{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(deepspeed_config(stage), indent=1) + "\n")
    return path


def launch_command(train_argv: list[str], gpus: int, fsdp: bool = False, deepspeed_file: Path | None = None,
                   batch_size: int | None = None, grad_accum: int | None = None, port: int | None = None) -> list[str]:
    """`accelerate launch ... -m trainer train ARGV` for `gpus` processes on this machine."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--num_processes", str(gpus), "--main_process_port", str(port or 0),
           "--mixed_precision", "no", "--dynamo_backend", "no"]   # the Trainer's bf16/fp16 flag decides
    if fsdp:
        cmd += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT",
                "--fsdp_cpu_ram_efficient_loading", "false"]
    elif deepspeed_file:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed_file)]
    else:
        cmd += ["--multi_gpu"]     # torchrun underneath; on CPU processes (--cpu-procs) it is DDP over gloo
    cmd += ["-m", "trainer", "train", *train_argv]
    if batch_size is not None:
        cmd += ["--set", f"batch_size={batch_size}"]
    if grad_accum is not None:
        cmd += ["--set", f"grad_accum={grad_accum}"]
    return cmd


def check_launch(cfg, gpus: int, fsdp: bool, deepspeed: str | None, visible: int, cpu_procs: int = 0) -> None:
    """What the flags ask for must make sense together (checked first: it is what the user typed),
    then fit this machine."""
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be >= 1")
    if fsdp and deepspeed:
        raise UserError("--fsdp and --deepspeed: choose one")
    if fsdp and cfg.bits:
        raise UserError(f"--fsdp with bits {cfg.bits}: 4/8-bit weights are not sharded here -- drop --fsdp "
                        "(LoRA/QLoRA run as DDP: the quantized base is small, only the adapter is synced) "
                        "or use --set bits=none")
    if deepspeed in ("zero3", "zero3_offload") and getattr(cfg, "fused_loss", False):
        # the fused loss multiplies by lm_head's weight outside the module's forward, where ZeRO-3 has
        # not gathered it (an empty shard: "size of tensor a (0) must match ...")
        raise UserError(f"--deepspeed {deepspeed} with fused_loss: not supported -- add --set fused_loss=false "
                        "(or use --fsdp, which works with it)")
    if cpu_procs:
        if gpus > 1:
            raise UserError("--cpu-procs and --gpus: choose one (--cpu-procs is the test stand-in for GPUs)")
        if cpu_procs < 2:
            raise UserError(f"--cpu-procs {cpu_procs}: must be >= 2 (one process is the plain command)")
    elif visible == 0:
        flag = "--fsdp" if fsdp else f"--deepspeed {deepspeed}" if deepspeed else f"--gpus {gpus}"
        raise UserError(f"{flag}: no CUDA GPU is visible -- train without it on this machine "
                        "(or set CUDA_VISIBLE_DEVICES)")
    elif gpus > visible:
        raise UserError(f"--gpus {gpus}: only {visible} CUDA GPU(s) visible -- lower --gpus "
                        "(or set CUDA_VISIBLE_DEVICES)")
    elif fsdp and gpus == 1:
        raise UserError("--fsdp shards over several GPUs -- add --gpus N (N >= 2), or drop --fsdp on one GPU")
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--deepspeed {deepspeed}: deepspeed is not installed -- `pip install deepspeed`, "
                        "or use --fsdp (built into PyTorch)")


def per_gpu_batch(cfg, gpus: int) -> tuple[int, int, str]:
    """(batch_size, grad_accum) per GPU that keep the preset's global batch -- fewer accumulation steps
    when they divide by N, else a smaller micro-batch when it does -- and a note saying what happened.
    The same global batch means the same optimizer steps and lr schedule as on one GPU."""
    total = cfg.batch_size * cfg.grad_accum
    if cfg.grad_accum % gpus == 0:
        batch, accum = cfg.batch_size, cfg.grad_accum // gpus
    elif cfg.batch_size % gpus == 0:
        batch, accum = cfg.batch_size // gpus, cfg.grad_accum
    else:
        return cfg.batch_size, cfg.grad_accum, (
            f"global batch is {total * gpus} rows, not {total}: neither batch_size {cfg.batch_size} nor "
            f"grad_accum {cfg.grad_accum} divides by {gpus}")
    return batch, accum, f"global batch kept at {total} rows (batch_size {batch} x grad_accum {accum} x {gpus} GPUs)"


def run_launcher(cmd: list[str], env=None, grace: float = 60.0) -> int:
    """Run the accelerate launcher and wait. Interrupted (Ctrl-C, or SIGTERM raised as an exception by
    trainer/__main__.py), pass it on as SIGTERM and give the workers `grace` seconds to clean up:
    subprocess.call would SIGKILL the launcher and orphan the workers on the GPUs."""
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()           # torchrun forwards it to every worker
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def maybe_launch(cfg, args, argv: list[str], echo=print, run=run_launcher) -> int | None:
    """Launch N workers when `--gpus N` (N > 1) was asked for and return their exit code; in a
    worker, pin this process to its GPU (before any model loads) and return None."""
    if is_worker():
        import torch

        if os.environ.get(STARTED_FILE):
            Path(os.environ[STARTED_FILE]).touch()      # the launch worked: a failure from here on is real
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))   # device_map "cuda" = this rank's GPU
        return None
    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: must be >= 1")
    if args.gpus == 1 and not (args.fsdp or args.deepspeed or args.cpu_procs):
        return None
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_launch(cfg, args.gpus, args.fsdp, args.deepspeed, visible, args.cpu_procs)
    procs = args.cpu_procs or args.gpus
    batch, accum, note = per_gpu_batch(cfg, procs)
    ds_file = write_deepspeed_config(cfg.work_dir, args.deepspeed) if args.deepspeed else None
    cmd = launch_command(strip_launch_flags(argv), procs, args.fsdp, ds_file, batch_size=batch, grad_accum=accum)
    mode = "FSDP2" if args.fsdp else f"DeepSpeed {args.deepspeed}" if args.deepspeed else "DDP"
    env = dict(os.environ)
    if args.cpu_procs:    # hide any GPU: every worker then trains on the CPU and the Trainer picks gloo
        env["CUDA_VISIBLE_DEVICES"] = ""
        mode += " on CPU processes, gloo"
    echo(f"launching {procs} processes ({mode}); {note}")
    with tempfile.TemporaryDirectory(prefix="launch-") as tmp:
        started = Path(tmp) / "started"
        env[STARTED_FILE] = str(started)
        for attempt in range(1, LAUNCH_TRIES + 1):
            rc = run(cmd, env=env)
            if rc == 0 or started.exists() or attempt == LAUNCH_TRIES:
                return rc
            echo(f"the launcher failed before any worker started (try {attempt} of {LAUNCH_TRIES}; e.g. its "
                 "rendezvous port was taken in the meantime) -- launching again")
