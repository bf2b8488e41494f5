"""`python -m trainer train CONFIG`: fine-tune (LoRA / QLoRA / full) from a preset or a YAML file.

    python -m trainer train smollm2_135m_lora --data data/identity.jsonl --work-dir work_dirs/me
    python -m trainer train internlm2_chat_1_8b_qlora --model /root/model --data data.jsonl
    python -m trainer train my.yaml --set lr=1e-4 --set epochs=3 --bits 4 [--resume [CKPT]] [--gpus N]
    python -m trainer train internlm2_chat_1_8b_qlora --data data.jsonl --merge-to work_dirs/merged

--merge-to OUT also writes the merged model (what `python -m trainer merge BASE WORK_DIR/final OUT` writes)
from this process once training ends: no second start-up of Python, torch and CUDA (the course's merge
took ~6 s instead of 18 s on an H100, docs/BENCHMARKS.md). Its checks run before training, so a bad OUT
fails in a second, not after the run.

The loop itself is trainer/engine/train.py; this resolves the base (trainer/bases/registry.py) and, with
--gpus / --cpu-procs, launches the workers (trainer/engine/distributed.py).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer.bases.registry import resolve_model
from trainer.engine import distributed
from trainer.engine.config import load_config
from trainer.engine.train import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="preset name (see list-cfg) or path to a YAML config")
    p.add_argument("--model", help="base model dir or embedded base name (overrides the config)")
    p.add_argument("--data", action="append", help="conversation file; repeat for several")
    p.add_argument("--work-dir", help="where checkpoints and the final adapter go")
    p.add_argument("--bits", choices=["4", "8", "none", "auto"],
                   help="4: QLoRA (nf4), 8: int8, none: no quantization, auto: none when bf16 fits memory_budget_gib")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set lr=1e-4")
    p.add_argument("--resume", nargs="?", const="latest", help="continue from the latest (or given) checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier finished run in --work-dir")
    p.add_argument("--merge-to", metavar="OUT", help="after training, merge the adapter into the base and write "
                   "the full model here (LoRA / QLoRA runs; trainer/export/merge.py)")
    p.add_argument("--merge-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the merged weights (auto: bf16 on a GPU, fp32 on the CPU)")
    distributed.add_arguments(p)       # --gpus N [--fsdp | --deepspeed zeroK]: trainer/engine/distributed.py
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sets = list(args.sets) + ([f"bits={args.bits}"] if args.bits else [])
    cfg = load_config(args.config, {"model": args.model, "data": args.data, "work_dir": args.work_dir}, sets)
    model_dir = resolve_model(cfg.model)   # an embedded base is built here once, not by N workers at a time
    merge_to = None if distributed.is_worker() else args.merge_to      # the launching process merges, once
    if merge_to:
        check_merge_target(cfg, model_dir, merge_to)
    launched = distributed.maybe_launch(cfg, args, list(sys.argv[1:] if argv is None else argv))
    if launched is not None:
        return launched if launched or not merge_to else merge_final(model_dir, cfg.work_dir, merge_to,
                                                                     args.merge_dtype)
    logging.basicConfig(level=logging.WARNING)
    final = train(cfg, resume=args.resume, model_dir=model_dir, overwrite=args.overwrite,
                  echo=lambda s: print(s, flush=True) if distributed.is_main_process() else None)
    return merge_final(model_dir, final.parent, merge_to, args.merge_dtype) if merge_to else 0


def check_merge_target(cfg, model_dir, out) -> None:
    """--merge-to's checks, before any training: a LoRA run, an unquantized base, a new OUT."""
    from inference.atomic import check_new_dir
    from inference.errors import UserError
    from trainer.export.merge import refuse_quantized

    if cfg.method != "lora":
        raise UserError(f"--merge-to: method {cfg.method} writes a full model already (WORK_DIR/final) -- "
                        "drop --merge-to")
    refuse_quantized(model_dir)
    check_new_dir(out)


def merge_final(model_dir, work_dir, out, dtype: str) -> int:
    """WORK_DIR/final merged into the base, written to OUT, in this process. The training model is gone
    by now (train() returned); its cached GPU blocks go back first so the merge has the whole card."""
    import gc

    import torch

    from trainer.export.merge import merge

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = merge(model_dir, Path(work_dir) / "final", out, dtype=dtype, device="auto", echo=print,
                warn=lambda s: print(s, file=sys.stderr))
    print(f"merged model written to {out}", flush=True)
    return 0
