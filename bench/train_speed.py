"""Training speed: the standard stacks vs our engine, same model shape, data, tokens per step.

    python bench/train_speed.py prepare --shape internlm2-1.8b --out /tmp/bench      # model dir + data
    python bench/train_speed.py run --impl plain_qlora --batch 8 --accum 2 --ckpt --name pq --root /tmp/bench --repeats 2
    python bench/train_speed.py run --impl ours --batch 4 --accum 2 --compile --fused-loss --name ours --root /tmp/bench
    python bench/train_speed.py report /tmp/bench                                    # table + summary.json
    python bench/train_speed.py --smoke                                              # every impl, tiny, on CPU

`prepare` writes a random-initialised model of the given shape (InternLM2-Chat-1.8B's: hidden 2048,
24 layers, 16 heads / 8 kv heads, intermediate 8192, vocab 92,544) with the tiny base's tokenizer and
chat template, and identity conversations from `python -m trainer data`. Each `run` is one process
(`--repeats N`: N processes one after another, results NAME-r1 ... NAME-rN):

- baseline, plain_qlora, bf16_lora: the standard stacks of bench/train_baselines.py (the PEFT-docs QLoRA,
  the strongest plain QLoRA, bf16 LoRA with per-layer compile), fed the same packed rows through the
  same collator, so every side computes on the same data in the same order;
- ours: `trainer.engine.train.train()` with the `internlm2_chat_1_8b_qlora` preset and the speed fields of
  trainer/engine/speed.py switched by flags.

Each writes `ROOT/runs/NAME/result.json`: every logged step's wall time (`step_times`, s), the median
s/step after `--warmup` with its spread (min-max and p10-p90 of those steps), tokens/s from the median
(mean tokens per timed step / median s/step) beside the window mean, peak GiB (max allocated), MFU
(from the median), and the per-step losses. The report shows median and min-max per run, and for
repeated runs the spread of their medians. FLOPs per token count what the step must do:
2N forward + 2N input-gradients for the frozen matmuls (lm_head included), 6N for LoRA, and the
attention actually attended (packed conversations attend only within themselves); recompute is not
counted. MFU is against `--peak-tflops` (the bf16 matmul rate measured on the card by gpu_suite.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_baselines import IMPLS, Profile, run_standard  # noqa: E402  (bench/ is a folder of scripts)
from train_report import report  # noqa: E402

SHAPES = {   # LlamaConfig fields; InternLM2 maps onto Llama (trainer/export/convert.py)
    "internlm2-1.8b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                           intermediate_size=8192, vocab_size=92544, max_position_embeddings=32768,
                           rope_theta=1e6),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6),
    "qwen2.5-14b": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=13824, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6),
    "cpu-132m": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                     intermediate_size=4096, vocab_size=3000, max_position_embeddings=4096),   # per-rank memory on CPU
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=3000, max_position_embeddings=4096),
}
PRESET = "internlm2_chat_1_8b_qlora"


def prepare(root: Path, shape: str, n_convs: int, tokenizer_from: Path | None, device: str) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from trainer.commands.data import main as data_main

    root.mkdir(parents=True, exist_ok=True)
    tok_dir = tokenizer_from or _tiny_base()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model_dir = root / f"model-{shape}"
    if not (model_dir / "config.json").is_file():
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                             eos_token_id=im_end, pad_token_id=tok.pad_token_id, dtype="bfloat16")
        t0 = time.time()
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)          # built in bf16: a 14B shape never exists in fp32
        with torch.device(device):
            model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
        model.generation_config = GenerationConfig(eos_token_id=[im_end], pad_token_id=tok.pad_token_id)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        print(f"prepare: {shape} random model -> {model_dir} ({time.time() - t0:.0f} s)", flush=True)
        del model
    data = root / "data.jsonl"
    if not data.is_file():
        assert data_main(["--name", "小助手", "--author", "小菜鸡", "--n", str(n_convs), "--out", str(data)]) == 0


def _tiny_base() -> Path:
    carried = REPO / ".whl" / "tiny-base"           # what gpu_suite.sh carries to the GPU machine
    if (carried / "tokenizer.json").is_file():
        return carried
    from trainer.bases.tiny import default_base

    return default_base()


def flops_per_token(config, lora_r: int, attended: float) -> float:
    d, L, i = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]        # q k v o gate up down
    frozen = L * sum(a * b for a, b in shapes) + d * config.vocab_size          # + lm_head
    lora = L * sum(lora_r * (a + b) for a, b in shapes)
    attention = L * 12 * d * attended          # QK^T and AV: 2 matmuls x 2 FLOPs, forward + 2x backward
    return 4 * frozen + 6 * lora + attention


def mean_attended(rows: list[dict]) -> float:
    """Mean number of keys a token attends to (its position within its conversation + 1)."""
    total = n = 0
    for row in rows:
        total += sum(p + 1 for p in row["position_ids"])
        n += len(row["position_ids"])
    return total / max(n, 1)


def step_clock(scalars: list[dict]) -> dict[int, tuple[float, float]]:
    """step -> (wall clock at its end, tokens so far). Under several GPUs every rank logs each step with
    its own token count: the slowest rank's clock, all ranks' tokens."""
    at: dict[int, tuple[float, float]] = {}
    for r in scalars:
        t, n = at.get(r["step"], (0.0, 0.0))
        at[r["step"]] = (max(t, r["elapsed_s"]), n + r.get("tokens", r["tokens_per_s"] * r["elapsed_s"]))
    return at


def steady(scalars: list[dict], warmup: int) -> dict:
    """tokens/s and s/step over the logged steps after `warmup` (compile and allocator warm-up)."""
    at = step_clock(scalars)
    steps = sorted(at)
    first, last = steps[min(warmup, len(steps) - 2)], steps[-1]
    span = at[last][0] - at[first][0]
    return {"tokens_per_s": (at[last][1] - at[first][1]) / span, "step_s": span / (last - first),
            "steps_timed": last - first}


def step_stats(scalars: list[dict], warmup: int) -> dict:
    """Every logged step's wall time, and the median / spread of those after `warmup` logged steps (the
    same window as `steady`); tokens/s from the median = mean tokens per timed step / median s/step."""
    at = step_clock(scalars)
    steps, times, tokens, prev = sorted(at), [], [], (0, 0.0, 0.0)
    for step in steps:
        t, n = at[step]
        times.append((t - prev[1]) / (step - prev[0]))
        tokens.append((n - prev[2]) / (step - prev[0]))
        prev = (step, t, n)
    skip = min(warmup, len(steps) - 2) + 1
    timed, timed_tokens = times[skip:] or times[-1:], tokens[skip:] or tokens[-1:]
    deciles = statistics.quantiles(timed, n=10, method="inclusive") if len(timed) > 1 else timed * 9
    median = statistics.median(timed)
    per_step = sum(timed_tokens) / len(timed_tokens)
    return {"step_times": [round(x, 4) for x in times], "step_s_median": round(median, 4),
            "step_s_min": round(min(timed), 4), "step_s_max": round(max(timed), 4),
            "step_s_p10": round(deciles[0], 4), "step_s_p90": round(deciles[8], 4),
            "tokens_per_step": round(per_step, 1), "tokens_per_s_median": round(per_step / median, 1)}


def _rows(model_dir: Path, data: Path, max_length: int):
    from transformers import AutoTokenizer

    from trainer.engine.dataset import encode_files, pack

    tok = AutoTokenizer.from_pretrained(model_dir)
    samples, _ = encode_files([str(data)], tok, max_length, None)
    return tok, pack(samples, max_length)


def run_ours(a, work: Path) -> dict:
    from trainer.engine.config import load_config
    from trainer.engine.train import train

    sets = [f"max_length={a.max_length}", f"batch_size={a.batch}", f"grad_accum={a.accum}", f"max_steps={a.steps}",
            "logging_steps=1", "evaluation_inputs=[]", "save_steps=0", "packing=true",
            f"gradient_checkpointing={str(a.ckpt).lower()}", f"checkpoint_fraction={a.ckpt_fraction}",
            f"compile={str(a.compile).lower()}", f"fused_loss={str(a.fused_loss).lower()}",
            f"attn_implementation={a.attn}"]
    if a.dtype:
        sets.append(f"dtype={a.dtype}")
    sets += a.extra_set
    if a.gpus > 1:     # the user's command: `python -m trainer train ... --gpus N` (trainer/engine/distributed.py)
        cmd = [sys.executable, "-m", "trainer", "train", PRESET, "--model", str(a.model_dir), "--data", str(a.data),
               "--work-dir", str(work), "--gpus", str(a.gpus), *(x for kv in sets for x in ("--set", kv))]
        print("+", " ".join(cmd[1:]), flush=True)
        if subprocess.call(cmd, cwd=REPO) != 0:
            raise SystemExit(f"{a.name}: the {a.gpus}-GPU run failed")
        return {}
    cfg = load_config(PRESET, {"model": str(a.model_dir), "data": [str(a.data)], "work_dir": str(work)}, sets)
    if a.profile:
        import trainer.engine.train as engine

        class ProfiledTrainer(engine.RetainTrainer):     # the engine's own Trainer, plus the profiling callback
            def __init__(self, *args, callbacks=None, **kwargs):
                super().__init__(*args, callbacks=(callbacks or []) + [Profile(work, a.steps - a.profile, a.profile)], **kwargs)

        engine.RetainTrainer = ProfiledTrainer
    train(cfg, echo=lambda s: print(s, flush=True))
    import yaml

    ran = yaml.safe_load((work / "config.yaml").read_text(encoding="utf-8"))     # bits auto: what it resolved to
    return {"quantised": bool(ran["bits"]), "dtype": ran["dtype"], "note": ""}


def run(a) -> int:
    if a.repeats > 1:
        return run_repeats(a)
    import torch
    from transformers import AutoConfig

    from trainer.engine.config import load_config

    if a.impl == "ours" and a.attn == "causal":
        raise SystemExit("--attn causal: baselines only (the engine keeps packed conversations apart)")
    work = a.root / "runs" / a.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    a.model_dir = a.root / f"model-{a.shape}"
    a.data = a.root / "data.jsonl"
    cfg = load_config(PRESET, {"work_dir": str(work)}, [f"max_length={a.max_length}"])
    tok, rows = _rows(a.model_dir, a.data, a.max_length)
    t0 = time.time()
    extra = run_ours(a, work) if a.impl == "ours" else run_standard(a, work, cfg, rows, tok, lambda s: print(s, flush=True))
    wall = time.time() - t0
    scalars = [json.loads(x) for x in (work / "scalars.jsonl").read_text().splitlines()]
    timed = [r for r in scalars if r["step"] <= a.steps - a.profile]     # profiled steps run slower
    speed, stats = steady(timed, a.warmup), step_stats(timed, a.warmup)
    config = AutoConfig.from_pretrained(a.model_dir)
    fpt = flops_per_token(config, cfg.lora_r, mean_attended(rows))
    on_gpu = torch.cuda.is_available()
    result = {
        "name": a.name, "impl": a.impl, "gpus": a.gpus, "shape": a.shape, "max_length": a.max_length, "batch": a.batch,
        "accum": a.accum, "ckpt": a.ckpt, "ckpt_fraction": a.ckpt_fraction, "compile": a.compile,
        "fused_loss": a.fused_loss, "attn": a.attn, "steps": a.steps, "warmup": a.warmup, "wall_s": round(wall, 1),
        **{k: round(v, 4) for k, v in speed.items()}, **stats, **(extra or {}),
        "peak_gib": max(r["peak_gib"] for r in scalars),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if on_gpu else None,
        "flops_per_token": fpt, "mfu": round(stats["tokens_per_s_median"] * fpt / (a.peak_tflops * 1e12), 4),
        "losses": [r["loss"] for r in sorted({r["step"]: r for r in scalars}.values(), key=lambda r: r["step"])],
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "versions": versions(),
    }
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(f"RESULT {a.name}: {result['tokens_per_s_median']:,.0f} tok/s at the median {result['step_s_median']:.3f} "
          f"s/step (min {result['step_s_min']:.3f}, max {result['step_s_max']:.3f}; window mean "
          f"{result['tokens_per_s']:,.0f} tok/s), peak {result['peak_gib']:.2f} GiB, MFU {result['mfu']:.1%}", flush=True)
    return 0


def run_repeats(a) -> int:
    """The same `run` N times, one process each, one after another: NAME-r1 ... NAME-rN."""
    failed = []
    for k in range(1, a.repeats + 1):
        cmd = [sys.executable, str(Path(__file__).resolve()), *a.argv, "--name", f"{a.name}-r{k}", "--repeats", "1"]
        print(f"+ repeat {k}/{a.repeats}: {a.name}-r{k}", flush=True)
        if subprocess.call(cmd) != 0:       # argparse keeps the last --name / --repeats
            failed.append(f"{a.name}-r{k}")
    if failed:
        print(f"FAILED {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def smoke(tokenizer_from: Path | None) -> int:
    """Everything on CPU with a tiny shape: the commands the GPU machine runs, checked here first."""
    root = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    me = [sys.executable, str(Path(__file__).resolve())]
    steps = ["--shape", "smoke", "--root", str(root), "--max-length", "256", "--steps", "4", "--warmup", "1"]
    tok = ["--tokenizer-from", str(tokenizer_from)] if tokenizer_from else []
    cmds = [me + ["prepare", "--shape", "smoke", "--out", str(root), "--n", "300", "--device", "cpu", *tok],
            me + ["run", "--impl", "baseline", "--batch", "2", "--accum", "2", "--ckpt", "--name", "base", *steps],
            me + ["run", "--impl", "ours", "--batch", "1", "--accum", "4", "--fused-loss", "--name", "ours",
                  "--dtype", "fp32", "--profile", "2", *steps],
            me + ["run", "--impl", "plain_qlora", "--batch", "2", "--accum", "2", "--ckpt", "--attn", "causal",
                  "--name", "pq", "--repeats", "2", *steps],
            me + ["run", "--impl", "bf16_lora", "--batch", "1", "--accum", "4", "--ckpt", "--compile", "--name", "bf",
                  *steps],
            me + ["report", str(root), "--baseline", "base", "--budget", "100"]]
    for cmd in cmds:
        print("+", " ".join(cmd[1:]), flush=True)
        if subprocess.call(cmd) != 0:
            return 1
    summary = json.loads((root / "summary.json").read_text())
    impls = {r["impl"] for r in summary["runs"]}
    ok = (summary.get("max_loss_diff") is not None and impls == {"ours", *IMPLS} and "pq" in summary["repeats"]
          and all(len(r["step_times"]) == r["steps"] for r in summary["runs"] if r["impl"] != "ours"))
    print(f"smoke {'ok' if ok else 'FAILED'}: {root} (impls {sorted(impls)})")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="run prepare + every impl + report tiny, on CPU")
    p.add_argument("--smoke-tokenizer", type=Path, help="tokenizer dir for --smoke (default: the tiny base's)")
    sub = p.add_subparsers(dest="cmd")
    pp = sub.add_parser("prepare")
    pp.add_argument("--shape", default="internlm2-1.8b", choices=sorted(SHAPES))
    pp.add_argument("--out", type=Path, required=True)
    pp.add_argument("--n", type=int, default=10001, help="identity conversations (the course used 10,001)")
    pp.add_argument("--tokenizer-from", type=Path)
    pp.add_argument("--device", default="cuda")
    pr = sub.add_parser("run")
    pr.add_argument("--impl", choices=["ours", *IMPLS], required=True,
                    help="ours: the engine; the rest: the standard stacks of bench/train_baselines.py")
    pr.add_argument("--name", required=True)
    pr.add_argument("--root", type=Path, required=True)
    pr.add_argument("--shape", default="internlm2-1.8b", choices=sorted(SHAPES))
    pr.add_argument("--max-length", type=int, default=2048)
    pr.add_argument("--batch", type=int, default=8)
    pr.add_argument("--accum", type=int, default=1)
    pr.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    pr.add_argument("--ckpt-fraction", type=float, default=1.0)
    pr.add_argument("--compile", action="store_true")
    pr.add_argument("--fused-loss", action="store_true")
    pr.add_argument("--attn", default="sdpa", choices=["sdpa", "flex_attention", "eager", "causal"],
                    help="attn_implementation (flex_attention: block-sparse over packed rows); causal: baselines "
                         "only, each packed row attends as one causal sequence (bench/train_baselines.py)")
    pr.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the last N optimizer steps, left out of the timing (WORK/profile.txt, .json)")
    pr.add_argument("--gpus", type=int, default=1, help="ours only: launch through `train --gpus N`")
    pr.add_argument("--extra-set", action="append", default=[], metavar="KEY=VALUE", help="ours only: more --set")
    pr.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"],
                    help="weights' dtype (default: the preset's for ours; bf16 on CUDA, fp32 on CPU for the rest)")
    pr.add_argument("--repeats", type=int, default=1, metavar="N",
                    help="run the same configuration N times, one process each: NAME-r1 ... NAME-rN")
    pr.add_argument("--steps", type=int, default=30)
    pr.add_argument("--warmup", type=int, default=5, help="logged steps left out of the timing")
    pr.add_argument("--peak-tflops", type=float, default=float(os.environ.get("PEAK_TFLOPS", 780)))
    rp = sub.add_parser("report")
    rp.add_argument("root", type=Path)
    rp.add_argument("--baseline")
    rp.add_argument("--ours")
    rp.add_argument("--budget", type=float, default=24.0, help="peak GiB a run must stay within")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)      # what `--repeats` runs again
    if a.smoke:
        return smoke(a.smoke_tokenizer)
    if a.cmd == "prepare":
        prepare(a.out, a.shape, a.n, a.tokenizer_from, a.device)
        return 0
    if a.cmd == "run":
        return run(a)
    if a.cmd == "report":
        report(a.root, a.baseline, a.ours, a.budget)
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
