"""QLoRA training speed: the standard stack vs our engine, same model shape, data, tokens per step.

    python bench/train_speed.py prepare --shape internlm2-1.8b --out /tmp/bench      # model dir + data
    python bench/train_speed.py run --impl baseline --batch 8 --ckpt --name base_mb8 --root /tmp/bench
    python bench/train_speed.py run --impl ours --batch 4 --accum 2 --compile --fused-loss --name ours --root /tmp/bench
    python bench/train_speed.py report /tmp/bench                                    # table + summary.json
    python bench/train_speed.py --smoke                                              # all of it, tiny, on CPU

`prepare` writes a random-initialised model of the given shape (InternLM2-Chat-1.8B's: hidden 2048,
24 layers, 16 heads / 8 kv heads, intermediate 8192, vocab 92,544) with the tiny base's tokenizer and
chat template, and identity conversations from `python -m trainer data`. Each `run` is one process:

- baseline: transformers Trainer + PEFT (`prepare_model_for_kbit_training`, LoRA r64 all-linear) +
  bitsandbytes nf4, eager, sdpa; fed the same packed rows through the same collator, so both sides
  compute the same function on the same data in the same order;
- ours: `trainer.engine.train.train()` with the `internlm2_chat_1_8b_qlora` preset and the speed fields of
  trainer/engine/speed.py switched by flags.

Each writes `ROOT/runs/NAME/result.json`: steady tokens/s (steps after `--warmup`), seconds per step,
peak GiB (max allocated), MFU, and the per-step losses. FLOPs per token count what the step must do:
2N forward + 2N input-gradients for the frozen matmuls (lm_head included), 6N for LoRA, and the
attention actually attended (packed conversations attend only within themselves); recompute is not
counted. MFU is against `--peak-tflops` (the bf16 matmul rate measured on the card by gpu_suite.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


def steady(scalars: list[dict], warmup: int) -> dict:
    """tokens/s and s/step over the logged steps after `warmup` (compile and allocator warm-up).
    Under several GPUs every rank logs each step with its own token count: those are summed."""
    by_step: dict[int, list[dict]] = {}
    for r in scalars:
        by_step.setdefault(r["step"], []).append(r)
    steps = sorted(by_step)
    first, last = steps[min(warmup, len(steps) - 2)], steps[-1]

    def tokens(step):
        return sum(r.get("tokens", r["tokens_per_s"] * r["elapsed_s"]) for r in by_step[step])

    def at(step):
        return max(r["elapsed_s"] for r in by_step[step])

    span = at(last) - at(first)
    return {"tokens_per_s": (tokens(last) - tokens(first)) / span, "step_s": span / (last - first),
            "steps_timed": last - first}


def _rows(model_dir: Path, data: Path, max_length: int):
    from transformers import AutoTokenizer

    from trainer.engine.dataset import encode_files, pack

    tok = AutoTokenizer.from_pretrained(model_dir)
    samples, _ = encode_files([str(data)], tok, max_length, None)
    return tok, pack(samples, max_length)


def run_baseline(a, work: Path, cfg) -> None:
    """The standard stack, as a user would write it from the PEFT/bitsandbytes docs."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments, set_seed

    from trainer.engine.callbacks import LogLine
    from trainer.engine.dataset import Collator

    set_seed(cfg.seed)                     # where train() seeds: same LoRA init, same data order
    tok, rows = _rows(a.model_dir, a.data, a.max_length)
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype, quantization_config=qconf,
                                                 device_map={"": "cuda" if on_gpu else "cpu"})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.ckpt)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    collator = Collator(tok.pad_token_id, packed=True)
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.accum,
        learning_rate=cfg.lr, max_steps=a.steps, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_strategy="no", seed=cfg.seed, data_seed=cfg.seed,
        bf16=on_gpu, use_cpu=not on_gpu, report_to=[], disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0)
    callbacks = [LogLine(collator, cfg, lambda s: print(s, flush=True))]
    callbacks += [Profile(work, a.steps - a.profile, a.profile)] if a.profile else []
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=callbacks)
    trainer.train()


def Profile(work: Path, start: int, steps: int):
    """A TrainerCallback that runs torch.profiler over `steps` optimizer steps after step `start` and
    writes where the time went: WORK/profile.txt (top kernels / ops) and WORK/profile.json (GPU busy
    share of the wall time, top 25 kernels by device time)."""
    import torch
    from transformers import TrainerCallback

    class _Profile(TrainerCallback):
        prof = None
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                acts += [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is None or state.global_step != start + steps:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            # kernels only: an aten op and the kernels it launches both carry the same device time
            dev = [e for e in events if getattr(e, "self_device_time_total", 0) > 0
                   and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA] or \
                  [e for e in events if getattr(e, "self_device_time_total", 0) > 0 and "::" not in e.key]
            busy = sum(e.self_device_time_total for e in dev) / 1e6
            top = sorted(dev, key=lambda e: -e.self_device_time_total)[:25]
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            (work / "profile.txt").write_text(events.table(sort_by=sort, row_limit=40, max_name_column_width=90))
            summary = {"steps": steps, "wall_s": wall, "device_busy_s": busy, "busy_share": busy / wall,
                       "top": [{"name": e.key[:120], "s": e.self_device_time_total / 1e6, "calls": e.count}
                               for e in top]}
            (work / "profile.json").write_text(json.dumps(summary, indent=1))
            print(f"PROFILE {steps} steps: wall {wall:.3f} s, device busy {busy:.3f} s ({busy / wall:.0%})", flush=True)
            for e in top[:12]:
                print(f"PROFILE {e.self_device_time_total / 1e6 / steps * 1e3:8.1f} ms/step {e.count // steps:6d}x "
                      f"{e.key[:90]}", flush=True)
            self.prof = None

    return _Profile()


def run_ours(a, work: Path) -> None:
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
        return
    cfg = load_config(PRESET, {"model": str(a.model_dir), "data": [str(a.data)], "work_dir": str(work)}, sets)
    if a.profile:
        import trainer.engine.train as engine

        class ProfiledTrainer(engine.Trainer):     # the engine's own Trainer, plus the profiling callback
            def __init__(self, *args, callbacks=None, **kwargs):
                super().__init__(*args, callbacks=(callbacks or []) + [Profile(work, a.steps - a.profile, a.profile)], **kwargs)

        engine.Trainer = ProfiledTrainer
    train(cfg, echo=lambda s: print(s, flush=True))


def run(a) -> int:
    import torch
    from transformers import AutoConfig

    from trainer.engine.config import load_config

    work = a.root / "runs" / a.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    a.model_dir = a.root / f"model-{a.shape}"
    a.data = a.root / "data.jsonl"
    cfg = load_config(PRESET, {"work_dir": str(work)}, [f"max_length={a.max_length}"])
    t0 = time.time()
    (run_baseline(a, work, cfg) if a.impl == "baseline" else run_ours(a, work))
    wall = time.time() - t0
    scalars = [json.loads(x) for x in (work / "scalars.jsonl").read_text().splitlines()]
    timed = [r for r in scalars if r["step"] <= a.steps - a.profile]     # profiled steps run slower
    speed = steady(timed, a.warmup)
    config = AutoConfig.from_pretrained(a.model_dir)
    _, rows = _rows(a.model_dir, a.data, a.max_length)
    fpt = flops_per_token(config, cfg.lora_r, mean_attended(rows))
    on_gpu = torch.cuda.is_available()
    result = {
        "name": a.name, "impl": a.impl, "gpus": a.gpus, "shape": a.shape, "max_length": a.max_length, "batch": a.batch,
        "accum": a.accum, "ckpt": a.ckpt, "ckpt_fraction": a.ckpt_fraction, "compile": a.compile,
        "fused_loss": a.fused_loss, "attn": a.attn, "steps": a.steps, "wall_s": round(wall, 1), **{k: round(v, 4) for k, v in speed.items()},
        "peak_gib": max(r["peak_gib"] for r in scalars),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if on_gpu else None,
        "flops_per_token": fpt, "mfu": round(speed["tokens_per_s"] * fpt / (a.peak_tflops * 1e12), 4),
        "losses": [r["loss"] for r in sorted({r["step"]: r for r in scalars}.values(), key=lambda r: r["step"])],
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "versions": versions(),
    }
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(f"RESULT {a.name}: {result['tokens_per_s']:,.0f} tok/s, {result['step_s']:.3f} s/step, "
          f"peak {result['peak_gib']:.2f} GiB, MFU {result['mfu']:.1%}", flush=True)
    return 0


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def report(root: Path, base: str | None, ours: str | None, budget: float) -> dict:
    results = [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/result.json"))]
    lines = [f"{'run':<22}{'impl':<9}{'mb x acc':>9}{'ckpt':>6}{'cmp':>5}{'fCE':>5}{'attn':>6}{'tok/s':>10}"
             f"{'s/step':>8}{'peak GiB':>10}{'MFU':>7}"]
    for r in results:
        ck = "no" if not r["ckpt"] else f"{r['ckpt_fraction']:.2g}"
        lines.append(f"{r['name']:<22}{r['impl']:<9}{r['batch']:>5} x {r['accum']:<2}{ck:>6}{'y' if r['compile'] else '-':>5}"
                     f"{'y' if r['fused_loss'] else '-':>5}{r.get('attn', 'sdpa')[:5]:>6}"
                     f"{r['tokens_per_s']:>10,.0f}{r['step_s']:>8.3f}"
                     f"{r['peak_gib']:>10.2f}{r['mfu']:>7.1%}")

    def best(impl):
        fit = [r for r in results if r["impl"] == impl and r["peak_gib"] <= budget]
        return max(fit, key=lambda r: r["tokens_per_s"]) if fit else None

    b = next((r for r in results if r["name"] == base), None) or best("baseline")
    o = next((r for r in results if r["name"] == ours), None) or best("ours")
    summary = {"runs": results, "budget_gib": budget}
    if b and o:
        summary.update(baseline=b["name"], ours=o["name"], speedup=o["tokens_per_s"] / b["tokens_per_s"])
        n = min(len(b["losses"]), len(o["losses"]))
        if n == 0:
            summary["max_loss_diff"] = None
        else:
            diffs = [abs(x - y) for x, y in zip(b["losses"][:n], o["losses"][:n])]
            summary.update(max_loss_diff=max(diffs), steps_compared=n, first_losses=[b["losses"][0], o["losses"][0]],
                           last_losses=[b["losses"][n - 1], o["losses"][n - 1]])
        lines.append(f"within {budget} GiB: baseline {b['name']} {b['tokens_per_s']:,.0f} tok/s, ours {o['name']} "
                     f"{o['tokens_per_s']:,.0f} tok/s -> {summary['speedup']:.2f}x; loss curves max |diff| "
                     f"{summary.get('max_loss_diff')} over {summary.get('steps_compared')} steps")
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    return summary


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
            me + ["report", str(root), "--budget", "100"]]
    for cmd in cmds:
        print("+", " ".join(cmd[1:]), flush=True)
        if subprocess.call(cmd) != 0:
            return 1
    summary = json.loads((root / "summary.json").read_text())
    print(f"smoke ok: {root}")
    return 0 if summary.get("max_loss_diff") is not None else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="run prepare + both impls + report tiny, on CPU")
    p.add_argument("--smoke-tokenizer", type=Path, help="tokenizer dir for --smoke (default: the tiny base's)")
    sub = p.add_subparsers(dest="cmd")
    pp = sub.add_parser("prepare")
    pp.add_argument("--shape", default="internlm2-1.8b", choices=sorted(SHAPES))
    pp.add_argument("--out", type=Path, required=True)
    pp.add_argument("--n", type=int, default=10001, help="identity conversations (the course used 10,001)")
    pp.add_argument("--tokenizer-from", type=Path)
    pp.add_argument("--device", default="cuda")
    pr = sub.add_parser("run")
    pr.add_argument("--impl", choices=["baseline", "ours"], required=True)
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
    pr.add_argument("--attn", default="sdpa", choices=["sdpa", "flex_attention", "eager"],
                    help="ours only: attn_implementation (flex_attention: block-sparse over packed rows)")
    pr.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the last N optimizer steps, left out of the timing (WORK/profile.txt, .json)")
    pr.add_argument("--gpus", type=int, default=1, help="ours only: launch through `train --gpus N`")
    pr.add_argument("--extra-set", action="append", default=[], metavar="KEY=VALUE", help="ours only: more --set")
    pr.add_argument("--dtype", help="override the preset's dtype (the CPU smoke uses fp32)")
    pr.add_argument("--steps", type=int, default=30)
    pr.add_argument("--warmup", type=int, default=5, help="logged steps left out of the timing")
    pr.add_argument("--peak-tflops", type=float, default=float(os.environ.get("PEAK_TFLOPS", 780)))
    rp = sub.add_parser("report")
    rp.add_argument("root", type=Path)
    rp.add_argument("--baseline")
    rp.add_argument("--ours")
    rp.add_argument("--budget", type=float, default=24.0, help="peak GiB a run must stay within")
    a = p.parse_args(argv)
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
