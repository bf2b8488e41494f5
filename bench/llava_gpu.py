"""The course's LLaVA fine-tune shape on a GPU: peak memory and step time of QLoRA with our mm-train.

    python bench/llava_gpu.py [--steps 20] [--batch-sizes 1,4,16] [--bits 4] [--out results.json]
    python bench/llava_gpu.py --smoke          # a tiny shape on CPU: proves the script end to end

Builds the course's configuration with random weights (nothing to download): a CLIP ViT-L/14-336
vision tower (24 layers, 1024 wide, 576 image tokens) and an InternLM2-Chat-1.8B-shaped Llama
(hidden 2048, 24 layers, 16 heads / 8 kv heads, intermediate 8192, vocab 92544), assembled into a
LlavaForConditionalGeneration by trainer/multimodal/model.py. Then, for each batch size, runs
`mm-train` stage finetune as XTuner's `llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1`
does: the LLM in 4-bit nf4 with LoRA r 512 / alpha 256, LoRA r 64 / alpha 16 on the vision tower, the
projector trained whole, gradient checkpointing, bf16, on synthetic 336x336 shape images.
Reports peak GPU memory (allocated and reserved, model load included) and the step time (median over
the steps after `--warmup`), as a table and as JSON (`--out`, else $OUT/llava_gpu.json when $OUT is
set). The course's budget for this stage is 24 GB (30% of an A100).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COURSE_BUDGET_GIB = 24.0
LLM_SHAPE = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=92544, max_position_embeddings=4096, rope_theta=1e6)
VISION_SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    patch_size=14, image_size=336, projection_dim=768)
SMOKE_LLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, max_position_embeddings=1024, rope_theta=1e4)
SMOKE_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    patch_size=8, image_size=32, projection_dim=32)


def build_random_parts(work: Path, smoke: bool, device: str, dtype) -> tuple[Path, Path]:
    """Random-weight LLM (with tokenizer) and CLIP vision tower dirs, in the course's shapes."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from trainer.multimodal.standins import build_tokenizer, domain_texts

    tok = build_tokenizer(domain_texts())        # random weights: only the ids matter (no sentencepiece needed)
    llm_dir, clip_dir = work / "llm", work / "clip"
    torch.manual_seed(0)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(**(SMOKE_LLM if smoke else LLM_SHAPE), tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=im_end, pad_token_id=tok.pad_token_id)
    with torch.device(device):           # random init on the GPU: seconds instead of minutes on the host
        llm = LlamaForCausalLM(config).to(dtype)
    llm.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[im_end],
                                             pad_token_id=tok.pad_token_id, do_sample=False)
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    del llm
    with torch.device(device):
        clip = CLIPVisionModel(CLIPVisionConfig(**(SMOKE_VISION if smoke else VISION_SHAPE))).to(dtype)
    clip.save_pretrained(clip_dir)
    del clip
    return llm_dir, clip_dir


class StepTimer:
    """Wall time of each optimizer step (CUDA synchronised, so the GPU work is inside the interval)."""

    def __init__(self):
        from transformers import TrainerCallback

        import torch

        timer = self
        self.times: list[float] = []
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                sync()
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                sync()
                timer.times.append(time.perf_counter() - timer.t0)

        self.callback = _CB()


def run_one(base_dir: Path, data: Path, work: Path, batch: int, args, echo) -> dict:
    import torch

    from trainer.multimodal.config import MultimodalConfig
    from trainer.multimodal.train import train_mm

    cfg = MultimodalConfig(
        stage="finetune", model=str(base_dir), data=[str(data)], work_dir=str(work / f"run_bs{batch}"),
        bits=args.bits or None, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05,
        vision_lora=not args.no_vision_lora, vision_lora_r=64, vision_lora_alpha=16,
        gradient_checkpointing=not args.no_gc, dtype="auto", max_length=2048, max_steps=args.steps,
        batch_size=batch, lr=2e-4, warmup_ratio=0.03, logging_steps=max(1, args.steps // 4),
        evaluation_inputs=[], save_steps=0, seed=0)
    timer = StepTimer()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainable = {}

    def grab(line):      # the run's own log line carries the trainable-parameter count
        echo(line)
        if "trainable parameters" in line:
            trainable["n"] = int(line.rsplit(", ", 1)[-1].split()[0].replace(",", ""))

    t0 = time.perf_counter()
    train_mm(cfg, echo=grab, extra_callbacks=[timer.callback])
    total = time.perf_counter() - t0
    steady = timer.times[args.warmup:] or timer.times
    seq = _mean_tokens(work / f"run_bs{batch}" / "scalars.jsonl", batch)
    row = {"batch_size": batch, "steps": len(timer.times), "step_s_median": statistics.median(steady),
           "step_s_mean": statistics.fmean(steady), "first_step_s": timer.times[0], "run_s": total,
           "trainable_params": trainable.get("n"), "samples_per_s": batch / statistics.median(steady),
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None, **seq}
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _mean_tokens(scalars: Path, batch: int) -> dict:
    if not scalars.is_file():
        return {}
    recs = [json.loads(line) for line in scalars.read_text().splitlines() if line.strip()]
    return {"tokens_per_s_logged": recs[-1]["tokens_per_s"]} if recs else {}


def table(rows: list[dict], env: dict) -> str:
    lines = [f"LLaVA {env['shape']} | {env['device']} | bits {env['bits']} | LoRA r {env['lora_r']} "
             f"(+ vision r 64: {env['vision_lora']}) | grad ckpt {env['gradient_checkpointing']}",
             "| batch | step s (median) | samples/s | peak alloc GiB | peak reserved GiB | vs 24 GB course budget |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        alloc, res = r["peak_allocated_gib"], r["peak_reserved_gib"]
        fits = "-" if res is None else ("fits" if res <= COURSE_BUDGET_GIB else "over")
        fmt = (lambda v: "-" if v is None else f"{v:.2f}")
        lines.append(f"| {r['batch_size']} | {r['step_s_median']:.3f} | {r['samples_per_s']:.2f} | {fmt(alloc)} | "
                     f"{fmt(res)} | {fits} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 3 steps (checks the script works)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the step time")
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated; one run each")
    p.add_argument("--bits", type=int, choices=[0, 4, 8], default=4, help="quantize the LLM (4: QLoRA); 0: bf16 LoRA")
    p.add_argument("--lora-r", type=int, default=512)
    p.add_argument("--lora-alpha", type=int, default=256)
    p.add_argument("--no-vision-lora", action="store_true")
    p.add_argument("--no-gc", action="store_true", help="no gradient checkpointing")
    p.add_argument("--images", type=int, default=64, help="synthetic training images")
    p.add_argument("--work", help="scratch dir (default: a temp dir, removed at the end)")
    p.add_argument("--out", help="JSON results path (default: $OUT/llava_gpu.json when $OUT is set)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch_sizes, args.images = min(args.steps, 3), 1, "1,2", 9
        args.lora_r, args.lora_alpha = 8, 16

    missing = [m for m in ("PIL", "peft", "yaml", "matplotlib") + (("bitsandbytes",) if args.bits else ())
               if importlib.util.find_spec(m) is None]
    if missing:      # say it before minutes of model building, not after
        print(f"error: missing packages {missing} (pip install pillow peft pyyaml matplotlib bitsandbytes)",
              file=sys.stderr)
        return 2
    import torch
    import transformers

    from inference.llava_model import build_llava
    from trainer.multimodal.model import save_llava
    from trainer.multimodal.synthetic import write_shapes

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    work = Path(args.work or tempfile.mkdtemp(prefix="llava_bench_"))
    echo = (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    llm_dir, clip_dir = build_random_parts(work, args.smoke, device, dtype)
    model, processor = build_llava(str(llm_dir), str(clip_dir), -2, True, 0, dtype, device)
    base_dir = save_llava(model, processor, work / "llava-base", None)
    del model
    gc.collect()
    size = (SMOKE_VISION if args.smoke else VISION_SHAPE)["image_size"]
    data = write_shapes(work / "data", n=args.images, heldout=0, size=size)["questions"]
    echo(f"built random {'smoke' if args.smoke else 'course'}-shape LLaVA in {time.perf_counter() - t0:.0f} s: {base_dir}")

    rows = [run_one(base_dir, data, work, int(b), args, echo) for b in args.batch_sizes.split(",")]
    env = {"shape": "smoke (tiny)" if args.smoke else "CLIP ViT-L/14-336 + InternLM2-1.8B shape (random weights)",
           "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
           "bits": args.bits, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
           "vision_lora": not args.no_vision_lora, "gradient_checkpointing": not args.no_gc,
           "image_tokens": (size // (SMOKE_VISION if args.smoke else VISION_SHAPE)["patch_size"]) ** 2,
           "torch": torch.__version__, "transformers": transformers.__version__, "steps": args.steps,
           "warmup_steps_excluded": args.warmup, "course_budget_gib": COURSE_BUDGET_GIB}
    print(table(rows, env), flush=True)
    result = {"env": env, "rows": rows}
    out = args.out or (str(Path(os.environ["OUT"]) / "llava_gpu.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"results written to {out}")
    print(json.dumps(result))
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from inference.errors import run_cli

    sys.exit(run_cli(main))
