"""Several GPUs through the user's own command (`python -m trainer train ... --gpus N [--fsdp|--deepspeed]`).

    python bench/multi_gpu.py suite --root /tmp/mg --out $OUT --budget 520     # all of it, in order, on 2 GPUs
    python bench/multi_gpu.py tiny --root /tmp/mg --out $OUT                   # 2-GPU adapter to bring home
    python bench/multi_gpu.py scaling --root /tmp/mg --steps 100               # 1.8B QLoRA, 1 vs 2 GPUs
    python bench/multi_gpu.py big --root /tmp/mg --shape qwen2.5-7b --engine fsdp   # or --engine zero3
    python bench/multi_gpu.py --smoke                                          # every mode, tiny, on CPU

`tiny`: the tiny base, LoRA, DDP on 2 GPUs; its `final/` (+ scalars, sample chats) tarred into OUT,
small enough to bring back and merge / chat on a CPU.
`scaling`: the 1.8B QLoRA preset (bench/train_speed.py's random-init InternLM2 shape) on 1 GPU and on
2 (`--gpus 2`: the launcher halves grad_accum, so the global batch is the same); tokens/s and s/step
after `--warmup` steps, the speed-up, and the largest loss difference step by step.
`big`: full fine-tuning of a 7B shape (fp32 master weights + gradients + AdamW: 16 bytes a parameter,
114 GiB for Qwen2.5-7B's 7.6B) with FSDP2 or DeepSpeed ZeRO-3 on 2 GPUs; stopped once `--steps`
steps are logged (the 30 GB final save would only time the disk); peak memory per GPU read with
nvidia-smi while it runs (what the card had to hold: allocator cache and CUDA context included) and
rank 0's `max_memory_allocated` from the log.
Every run has a hard time limit (its process group is killed) and writes ROOT/runs/NAME/result.json
and train.log; a run stopped at its limit still reports the steps it logged. `suite` runs tiny,
scaling and big in that order inside `--budget` seconds and copies results and the tiny checkpoint
into OUT after each part. `--smoke` runs the suite with CPU processes (`--cpu-procs 2`) instead of GPUs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_speed  # noqa: E402  (bench/ is a folder of scripts, not a package)

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):      # the GPU host's rule: no NVLink multicast
    os.environ.setdefault(_name, _value)


def gpu_memory_used() -> list[float] | None:
    """GiB in use on each visible GPU, or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return [float(x) / 1024 for x in out.split()]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def gpu_process_memory() -> dict[str, float]:
    """GiB each process holds on each GPU ("gpu0:pid123"): shows a rank that also allocates on
    another rank's GPU. Empty where nvidia-smi cannot see the processes (some containers)."""
    try:
        uuids = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10).stdout
        index = {u.strip(): i.strip() for i, u in (line.split(",") for line in uuids.splitlines() if "," in line)}
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        out = {}
        for line in apps.splitlines():
            uuid, pid, used = (x.strip() for x in line.split(","))
            out[f"gpu{index.get(uuid, uuid)}:pid{pid}"] = float(used) / 1024
        return out
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def rank_rss_peaks(root_pid: int) -> dict[str, float]:
    """Peak resident GiB (VmHWM) of each training process under `root_pid`, keyed "rank0"...: how the
    CPU runs (`--cpu`) show per-rank memory, where nvidia-smi has nothing to say."""
    parent = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue        # the process ended while being read
    out = {}
    for pid in parent:
        up = pid
        while up in parent and up != root_pid:
            up = parent[up]
        if up != root_pid:
            continue
        try:
            rank = re.search(rb"(?:^|\0)RANK=(\d+)\0", Path(f"/proc/{pid}/environ").read_bytes())
            hwm = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        except OSError:
            continue
        if hwm and (rank or pid == root_pid):       # "main": the trainer on one process, the launcher on several
            out[f"rank{rank.group(1).decode()}" if rank else "main"] = int(hwm.group(1)) / 2**20
    return out


def read_scalars(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_until(cmd: list[str], work: Path, stop_step: int | None, limit: float, env=None) -> dict:
    """Run `cmd` (log: WORK/train.log) in its own process group; stop it once `stop_step` is logged
    (None: let it finish) or after `limit` seconds. Polls nvidia-smi for per-GPU peaks meanwhile."""
    work.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(str(c) for c in cmd[1:]), flush=True)
    peaks, per_process, t0, reached = None, {}, time.time(), False
    with open(work / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        while proc.poll() is None and time.time() - t0 < limit:
            time.sleep(1)
            used = gpu_memory_used()
            if used:
                peaks = [max(a, b) for a, b in zip(peaks or [0.0] * len(used), used)]
            for key, gib in [*gpu_process_memory().items(), *rank_rss_peaks(proc.pid).items()]:
                per_process[key] = max(per_process.get(key, 0.0), gib)
            if stop_step and any(r["step"] >= stop_step for r in read_scalars(work / "scalars.jsonl")):
                reached = True
                break
        stopped = proc.poll() is None
        if stopped:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    tail = (work / "train.log").read_text(errors="replace")[-1500:]
    return {"returncode": None if stopped else proc.returncode, "stopped": stopped, "reached": reached,
            "wall_s": round(time.time() - t0, 1), "gpu_peak_gib_nvidia_smi": [round(p, 1) for p in peaks or []],
            "process_peak_gib": {k: round(v, 2) for k, v in sorted(per_process.items())},
            "out_of_memory": "OutOfMemoryError" in tail or "CUDA out of memory" in tail,
            "log_tail": tail}


def train_cmd(model: Path, data: Path, work: Path, procs: int, cpu: bool, sets: list[str], extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "trainer", "train", train_speed.PRESET, "--model", str(model), "--data", str(data),
           "--work-dir", str(work), *extra, *(x for kv in sets for x in ("--set", kv))]
    if procs > 1:
        cmd += ["--cpu-procs" if cpu else "--gpus", str(procs)]
    return cmd


def limit_of(a, limit: float, share: float = 1.0) -> float:
    """`limit`, or less when the suite's deadline (`--deadline`, epoch seconds) comes sooner."""
    if a.deadline:
        limit = min(limit, (a.deadline - time.time() - 5) * share)
    return max(limit, 1.0)


def save(work: Path, result: dict) -> dict:
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return result


# ---- tiny: the 2-GPU checkpoint to bring home ----

def tiny(a) -> int:
    from trainer.commands.data import main as data_main

    base = train_speed._tiny_base()
    data = a.root / "tiny-identity.jsonl"
    if not data.is_file():
        data_main(["--name", "Lumi", "--author", "小菜鸡", "--n", "400", "--out", str(data)])
    a.out.mkdir(parents=True, exist_ok=True)
    name, steps = "tiny_lora_ddp", a.steps
    work = a.root / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "trainer", "train", "tiny", "--model", str(base), "--data", str(data),
           "--work-dir", str(work), "--cpu-procs" if a.cpu else "--gpus", str(a.gpus), "--set", f"max_steps={steps}",
           "--set", "logging_steps=5", "--set", "evaluation_inputs=[你是谁]", "--set", "evaluation_freq=0"]
    run = run_until(cmd, work, None, limit_of(a, a.limit))
    final = work / "final"
    ok = run["returncode"] == 0 and (final / "adapter_model.safetensors").is_file()
    if ok:
        with tarfile.open(a.out / f"{name}.tgz", "w:gz") as tar:
            tar.add(final, arcname=f"{name}/final")
            for extra in ("scalars.jsonl", f"eval_outputs_step_{steps}.txt", "config.yaml", "train.log"):
                if (work / extra).is_file():
                    tar.add(work / extra, arcname=f"{name}/{extra}")
    save(work, {"name": name, "gpus": a.gpus, **run, "losses": [r["loss"] for r in read_scalars(work / "scalars.jsonl")]})
    print(f"RESULT {name}: exit {run['returncode']} in {run['wall_s']} s, "
          f"{'adapter -> ' + str(a.out / (name + '.tgz')) if ok else 'no adapter'}", flush=True)
    return 0 if ok else 1


# ---- scaling: 1 vs 2 GPUs, same global batch ----

def compare(one: list[dict], two: list[dict], warmup: int) -> dict:
    """Speed-up of `two` over `one` and their loss difference over the steps both logged."""
    out = {}
    if len(one) > warmup + 1 and len(two) > warmup + 1:
        s1, s2 = train_speed.steady(one, warmup), train_speed.steady(two, warmup)
        out.update(tokens_per_s=[round(s1["tokens_per_s"]), round(s2["tokens_per_s"])],
                   step_s=[round(s1["step_s"], 4), round(s2["step_s"], 4)],
                   speedup_tokens=round(s2["tokens_per_s"] / s1["tokens_per_s"], 3),
                   speedup_step=round(s1["step_s"] / s2["step_s"], 3))
    l1, l2 = {r["step"]: r["loss"] for r in one}, {r["step"]: r["loss"] for r in two}
    common = sorted(set(l1) & set(l2))
    if common:
        diffs = [abs(l1[s] - l2[s]) for s in common]
        out.update(steps_compared=len(common), max_abs_loss_diff=round(max(diffs), 5),
                   max_rel_loss_diff=round(max(d / abs(l1[s]) for d, s in zip(diffs, common)), 5),
                   losses_first=[l1[common[0]], l2[common[0]]], losses_last=[l1[common[-1]], l2[common[-1]]])
    return out


def scaling(a) -> int:
    train_speed.prepare(a.root, a.shape, a.n, None, "cpu" if a.cpu else "cuda")
    model, data = a.root / f"model-{a.shape}", a.root / "data.jsonl"
    sets = [f"max_length={a.max_length}", f"batch_size={a.batch}", f"grad_accum={a.accum}", f"max_steps={a.steps}",
            "logging_steps=1", "evaluation_inputs=[]", "save_steps=0", "packing=true", *a.set]
    runs = {}
    for procs, limit, share in ((1, a.limit_one, 0.55), (a.gpus, a.limit_two, 1.0)):
        name = f"scale_{a.shape}_L{a.max_length}_b{a.batch}_{procs}{'proc' if a.cpu else 'gpu'}"
        work = a.root / "runs" / name
        shutil.rmtree(work, ignore_errors=True)
        env = None if a.cpu or procs > 1 else {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
        run = run_until(train_cmd(model, data, work, procs, a.cpu, sets), work, None, limit_of(a, limit, share), env=env)
        runs[procs] = read_scalars(work / "scalars.jsonl")
        save(work, {"name": name, "procs": procs, "sets": sets, **run, "scalars": runs[procs]})
        print(f"RESULT {name}: exit {run['returncode']}, {len(runs[procs])} steps logged in {run['wall_s']} s", flush=True)
    result = {"shape": a.shape, "gpus": [1, a.gpus], "sets": sets, "warmup": a.warmup,
              **compare(runs[1], runs[a.gpus], a.warmup), "versions": train_speed.versions()}
    (a.root / "runs" / f"scaling_L{a.max_length}_b{a.batch}.json").write_text(json.dumps(result, indent=1))
    print(f"RESULT scaling {a.shape} 1 -> {a.gpus}: {json.dumps({k: v for k, v in result.items() if k != 'versions'})}",
          flush=True)
    return 0 if "speedup_step" in result else 1


# ---- big: full fine-tuning that needs several GPUs ----

def big(a) -> int:
    engine_flags = {"fsdp": ["--fsdp"], "zero3": ["--deepspeed", "zero3"], "single": []}[a.engine]
    if a.engine == "single":    # the same job on one GPU: the out-of-memory the engines are there to avoid
        a.gpus = 1
    if a.engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        print("RESULT big zero3: skipped, deepspeed is not importable (carry .whl/deepspeed-*.whl)", flush=True)
        return 1
    train_speed.prepare(a.root, a.shape, a.n, None, "cpu" if a.cpu else "cuda")
    name = f"{a.engine}_full_{a.shape}_{a.gpus}{'proc' if a.cpu else 'gpu'}"
    work = a.root / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    model_dir = a.root / f"model-{a.shape}"
    sets = ["method=full", "bits=none", "lr=1e-5", f"max_length={a.max_length}", f"batch_size={a.batch}",
            "grad_accum=1", f"max_steps={a.steps + 1000}", "logging_steps=1", "save_steps=0", "packing=true",
            "gradient_checkpointing=true", f"fused_loss={str(a.engine != 'zero3').lower()}",   # ZeRO-3 refuses it
            "evaluation_freq=0", "eval_max_new_tokens=4",
            # one sample chat before step 1: generation between training steps under the engine
            "evaluation_inputs=[你是谁]", *a.set]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"} if a.engine == "single" and not a.cpu else None
    run = run_until(train_cmd(model_dir, a.root / "data.jsonl", work, a.gpus, a.cpu, sets, engine_flags),
                    work, a.steps, limit_of(a, a.limit), env=env)
    scalars = read_scalars(work / "scalars.jsonl")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    n_params = train_speed.flops_per_token(config, 0, 0) / 4 + config.vocab_size * config.hidden_size
    result = {"name": name, "engine": a.engine, "shape": a.shape, "gpus": a.gpus, "params_b": round(n_params / 1e9, 2),
              "state_gib_16_bytes_a_param": round(16 * n_params / 2**30, 1), **run,
              "rank0_peak_allocated_gib": max((r["peak_gib"] for r in scalars), default=None),
              "losses": [r["loss"] for r in scalars], "versions": train_speed.versions()}
    if len(scalars) >= 3:
        result.update(train_speed.steady(scalars, min(2, len(scalars) - 2)))
    save(work, result)
    speed = f"{result['step_s']:.2f} s/step, {result['tokens_per_s']:,.0f} tok/s" if "step_s" in result else "no timing"
    print(f"RESULT {name}: {result['params_b']}B params, {result['state_gib_16_bytes_a_param']} GiB of fp32 "
          f"weights+grads+AdamW; {len(scalars)} steps logged in {run['wall_s']} s; per-GPU peak (nvidia-smi) "
          f"{result['gpu_peak_gib_nvidia_smi']} GiB, rank 0 allocated {result['rank0_peak_allocated_gib']} GiB; {speed}"
          f"{'; OUT OF MEMORY' if run['out_of_memory'] else ''}; per process {result['process_peak_gib']}",
          flush=True)
    return 0 if run["reached"] else 1


# ---- suite: all of it, in order, inside a time budget ----

def snapshot(root: Path, out: Path) -> None:
    """Results and logs (never weights) into OUT/multi_gpu_results.tgz."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "multi_gpu_results.tgz", "w:gz") as tar:
        for path in sorted((root / "runs").rglob("*")):
            if path.suffix in (".json", ".jsonl", ".log", ".txt", ".yaml") and "final" not in path.parts \
                    and not any(p.startswith("checkpoint-") for p in path.parts):
                tar.add(path, arcname=str(path.relative_to(root)))


def suite(a) -> int:
    t0 = time.time()
    left = lambda: a.budget - (time.time() - t0)          # noqa: E731
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--root", str(a.root), *(["--cpu"] if a.cpu else []), "--gpus", str(a.gpus), "--n", str(a.n)]
    parts = [   # (name, seconds it should take, hard limit, argv): the limit shrinks to what is left
        ("tiny", 45, 100, ["tiny", "--out", str(a.out), "--steps", str(a.tiny_steps)]),
        ("scaling", 200, 290, ["scaling", "--shape", a.scale_shape, "--steps", str(a.scale_steps),
                               "--warmup", str(a.scale_warmup),
                               *(x for kv in a.scale_set for x in ("--set", kv))]),
        ("big_fsdp", 130, 240, ["big", "--engine", "fsdp", "--shape", a.big_shape, "--steps", str(a.big_steps)]),
        ("big_zero3", 130, 240, ["big", "--engine", "zero3", "--shape", a.big_shape, "--steps", str(a.big_steps)]),
    ]
    status = {}
    for name, expect, limit, argv in parts:
        budget = min(limit, left() - 10)
        if budget < expect * 0.8:
            print(f"=== {name}: skipped, {left():.0f} s left (needs ~{expect} s)", flush=True)
            status[name] = "skipped"
            continue
        print(f"=== {name} ({time.time() - t0:.0f} s into the suite, limit {budget:.0f} s)", flush=True)
        deadline = time.time() + budget
        part = subprocess.Popen(me + argv + common + ["--deadline", str(deadline)], cwd=REPO, start_new_session=True)
        try:
            rc = part.wait(budget + 30)
        except subprocess.TimeoutExpired:      # a stuck part: its whole process group goes
            os.killpg(part.pid, signal.SIGKILL)
            part.wait()
            rc = "timeout"
        status[name] = rc
        print(f"=== {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        snapshot(a.root, a.out)
    (a.out / "multi_gpu_status.json").write_text(json.dumps(status, indent=1))
    print(f"== suite done in {time.time() - t0:.0f} s: {status}", flush=True)
    return 0 if all(v == 0 for v in status.values()) else 1


def smoke() -> int:
    """The suite on CPU processes with the smoke shape: every entry point the GPU run uses, checked here."""
    root = Path(tempfile.mkdtemp(prefix="multi-gpu-smoke-"))
    argv = ["suite", "--root", str(root / "r"), "--out", str(root / "out"), "--cpu", "--budget", "900",
            "--tiny-steps", "4", "--scale-shape", "smoke", "--scale-steps", "6", "--scale-warmup", "1", "--big-shape", "smoke",
            "--big-steps", "2", "--scale-set", "max_length=256", "--scale-set", "dtype=fp32", "--n", "300"]
    rc = main(argv)
    print(f"smoke: exit {rc}, results in {root}", flush=True)
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the suite on 2 CPU processes, tiny shapes")
    sub = p.add_subparsers(dest="cmd")

    def common(sp):
        sp.add_argument("--root", type=Path, required=True)
        sp.add_argument("--gpus", type=int, default=2)
        sp.add_argument("--cpu", action="store_true", help="CPU processes (--cpu-procs) instead of GPUs: smoke")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more --set for train")
        sp.add_argument("--n", type=int, default=10001, help="identity conversations generated for the data")
        sp.add_argument("--deadline", type=float, help="epoch seconds by which the mode must be done (suite)")
        return sp

    t = common(sub.add_parser("tiny"))
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--limit", type=float, default=150)
    s = common(sub.add_parser("scaling"))
    s.add_argument("--shape", default="internlm2-1.8b", choices=sorted(train_speed.SHAPES))
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--max-length", type=int, default=2048)
    s.add_argument("--batch", type=int, default=4, help="rows per GPU step (per process on 2 GPUs)")
    s.add_argument("--accum", type=int, default=2, help="on 1 GPU; halved on 2 by the launcher: same global batch")
    s.add_argument("--limit-one", type=float, default=180)
    s.add_argument("--limit-two", type=float, default=150)
    b = common(sub.add_parser("big"))
    b.add_argument("--shape", default="qwen2.5-7b", choices=sorted(train_speed.SHAPES))
    b.add_argument("--engine", choices=["fsdp", "zero3", "single"], default="fsdp",
                   help="single: the same job on one GPU, no engine (expected: out of memory)")
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--max-length", type=int, default=2048)
    b.add_argument("--limit", type=float, default=300)
    u = sub.add_parser("suite")
    u.add_argument("--root", type=Path, required=True)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--gpus", type=int, default=2)
    u.add_argument("--cpu", action="store_true")
    u.add_argument("--budget", type=float, default=520, help="seconds for all parts")
    u.add_argument("--n", type=int, default=10001, help="identity conversations generated for the data")
    u.add_argument("--tiny-steps", type=int, default=40)
    u.add_argument("--scale-shape", default="internlm2-1.8b", choices=sorted(train_speed.SHAPES))
    u.add_argument("--scale-steps", type=int, default=100)
    u.add_argument("--scale-warmup", type=int, default=10, help="logged steps left out of the timing")
    u.add_argument("--scale-set", action="append", default=[], metavar="KEY=VALUE",
                   help="our speed settings for the scaling runs, e.g. gradient_checkpointing=true")
    u.add_argument("--big-shape", default="qwen2.5-7b", choices=sorted(train_speed.SHAPES))
    u.add_argument("--big-steps", type=int, default=5)
    a = p.parse_args(argv)
    if a.smoke:
        return smoke()
    if a.cmd is None:
        p.print_help()
        return 2
    a.root.mkdir(parents=True, exist_ok=True)
    return {"tiny": tiny, "scaling": scaling, "big": big, "suite": suite}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
