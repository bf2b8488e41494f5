"""Several GPUs through the user's own command (`python -m trainer train ... --gpus N [--fsdp]`).

    python bench/multi_gpu.py big --root /tmp/bench --shape qwen2.5-14b --steps 6     # FSDP full FT
    python bench/multi_gpu.py tiny --root /tmp/bench --out OUT_DIR                   # checkpoints to bring home

`big`: full fine-tuning of a model whose weights + gradients + AdamW state (fp32 master weights, as
FSDP's mixed precision keeps them: 16 bytes a parameter) cannot fit one GPU, on N GPUs with FSDP2.
It stops the run once `--steps` steps are logged (the final consolidated save of 60 GB would only
measure the disk) and writes per-GPU peak memory and step time to `ROOT/runs/NAME/result.json`.

`tiny`: the tiny base trained on 2 GPUs with LoRA (DDP) and with full fine-tuning (FSDP2); both
`final/` dirs are tarred into OUT_DIR, small enough to bring back and merge / chat on a CPU.

Scaling of the 1.8B QLoRA preset (1 vs N GPUs, same global batch, loss curves) is
`bench/train_speed.py run --impl ours --gpus N`; `train_speed.py report --baseline ONE --ours N`
compares them.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_speed  # noqa: E402  (bench/ is a folder of scripts, not a package)


def launch_until(cmd: list[str], scalars: Path, steps: int, timeout: float, log) -> dict:
    """Run `cmd` in its own process group; stop it once `steps` steps are logged by every rank."""
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    t0, reached = time.time(), False
    while proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(2)
        if scalars.is_file():
            recs = [json.loads(x) for x in scalars.read_text().splitlines() if x.strip()]
            per_rank = sum(1 for r in recs if r["step"] >= steps)
            if per_rank >= 2:
                reached = True
                break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"reached": reached, "returncode": proc.returncode, "wall_s": round(time.time() - t0, 1)}


def big(a) -> int:
    train_speed.prepare(a.root, a.shape, a.n, None, "cuda")
    name = f"fsdp_full_{a.shape}_{a.gpus}gpu"
    work = a.root / "runs" / name
    work.mkdir(parents=True, exist_ok=True)
    model_dir = a.root / f"model-{a.shape}"
    sets = ["method=full", "bits=none", "lr=1e-5", f"max_length={a.max_length}", f"batch_size={a.batch}",
            "grad_accum=1", f"max_steps={a.steps + 1000}", "logging_steps=1", "evaluation_inputs=[]", "save_steps=0",
            "packing=true", "gradient_checkpointing=true", "fused_loss=true"]
    cmd = [sys.executable, "-m", "trainer", "train", train_speed.PRESET, "--model", str(model_dir),
           "--data", str(a.root / "data.jsonl"), "--work-dir", str(work), "--gpus", str(a.gpus), "--fsdp",
           *(x for kv in sets for x in ("--set", kv))]
    print("+", " ".join(cmd[1:]), flush=True)
    with open(work / "train.log", "w") as log:
        run = launch_until(cmd, work / "scalars.jsonl", a.steps, a.timeout, log)
    print((work / "train.log").read_text()[-3000:], flush=True)
    if not (work / "scalars.jsonl").is_file():
        print(f"RESULT {name}: no step logged ({run})")
        return 1
    scalars = [json.loads(x) for x in (work / "scalars.jsonl").read_text().splitlines() if x.strip()]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    params = train_speed.flops_per_token(config, 0, 0) / 4          # matmul parameters (lm_head included)
    n_params = params + config.vocab_size * config.hidden_size     # + input embeddings
    speed = train_speed.steady(scalars, min(2, a.steps - 1))
    peaks = sorted({r["peak_gib"] for r in scalars if r["step"] == max(x["step"] for x in scalars)})
    result = {"name": name, "shape": a.shape, "gpus": a.gpus, "params_b": round(n_params / 1e9, 2),
              "state_gib_one_gpu": round(16 * n_params / 2**30, 1), **run, **speed,
              "peak_gib_per_gpu": peaks, "losses": [r["loss"] for r in scalars][:: a.gpus],
              "versions": train_speed.versions()}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(f"RESULT {name}: {result['params_b']}B params, {result['state_gib_one_gpu']} GiB of fp32 weights+grads+Adam "
          f"on one GPU; {a.gpus} GPUs FSDP2: peak {peaks} GiB per GPU, {speed['step_s']:.2f} s/step, "
          f"{speed['tokens_per_s']:,.0f} tok/s", flush=True)
    return 0 if run["reached"] else 1


def tiny(a) -> int:
    from trainer.data_cli import main as data_main

    base = train_speed._tiny_base()
    data = a.root / "tiny-identity.jsonl"
    data_main(["--name", "Lumi", "--author", "小菜鸡", "--n", "400", "--out", str(data)])
    a.out.mkdir(parents=True, exist_ok=True)
    ok = True
    for name, extra in (("tiny_lora_ddp", []), ("tiny_full_fsdp", ["--fsdp", "--set", "method=full"])):
        work = a.root / "runs" / name
        cmd = [sys.executable, "-m", "trainer", "train", "tiny", "--model", str(base), "--data", str(data),
               "--work-dir", str(work), "--gpus", str(a.gpus), "--set", "max_steps=40", "--set", "logging_steps=5",
               "--set", "evaluation_inputs=[你是谁]", *extra]
        print("+", " ".join(cmd[1:]), flush=True)
        rc = subprocess.call(cmd, cwd=REPO)
        final = work / "final"
        print(f"RESULT {name}: exit {rc}, final: {sorted(p.name for p in final.iterdir()) if final.is_dir() else None}",
              flush=True)
        if rc != 0 or not final.is_dir():
            ok = False
            continue
        with tarfile.open(a.out / f"{name}.tgz", "w:gz") as tar:
            tar.add(final, arcname=f"{name}/final")
            for extra_file in ("scalars.jsonl", "eval_outputs_step_40.txt", "config.yaml"):
                if (work / extra_file).is_file():
                    tar.add(work / extra_file, arcname=f"{name}/{extra_file}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("big")
    b.add_argument("--root", type=Path, required=True)
    b.add_argument("--shape", default="qwen2.5-14b", choices=sorted(train_speed.SHAPES))
    b.add_argument("--gpus", type=int, default=2)
    b.add_argument("--steps", type=int, default=6)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--max-length", type=int, default=2048)
    b.add_argument("--n", type=int, default=10001)
    b.add_argument("--timeout", type=float, default=420)
    t = sub.add_parser("tiny")
    t.add_argument("--root", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--gpus", type=int, default=2)
    a = p.parse_args(argv)
    a.root.mkdir(parents=True, exist_ok=True)
    return big(a) if a.cmd == "big" else tiny(a)


if __name__ == "__main__":
    sys.exit(main())
