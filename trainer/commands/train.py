"""`python -m trainer train CONFIG`: fine-tune (LoRA / QLoRA / full) from a preset or a YAML file.

    python -m trainer train smollm2_135m_lora --data data/identity.jsonl --work-dir work_dirs/me
    python -m trainer train internlm2_chat_1_8b_qlora --model /root/model --data data.jsonl
    python -m trainer train my.yaml --set lr=1e-4 --set epochs=3 --bits 4 [--resume [CKPT]] [--gpus N]

The loop itself is trainer/engine/train.py; this resolves the base (trainer/bases/registry.py) and, with
--gpus / --cpu-procs, launches the workers (trainer/engine/distributed.py).
"""
from __future__ import annotations

import argparse
import logging
import sys

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
    distributed.add_arguments(p)       # --gpus N [--fsdp | --deepspeed zeroK]: trainer/engine/distributed.py
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sets = list(args.sets) + ([f"bits={args.bits}"] if args.bits else [])
    cfg = load_config(args.config, {"model": args.model, "data": args.data, "work_dir": args.work_dir}, sets)
    model_dir = resolve_model(cfg.model)   # an embedded base is built here once, not by N workers at a time
    launched = distributed.maybe_launch(cfg, args, list(sys.argv[1:] if argv is None else argv))
    if launched is not None:
        return launched
    logging.basicConfig(level=logging.WARNING)
    train(cfg, resume=args.resume, model_dir=model_dir, overwrite=args.overwrite,
          echo=lambda s: print(s, flush=True) if distributed.is_main_process() else None)
    return 0
