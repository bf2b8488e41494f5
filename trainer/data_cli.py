"""`python -m trainer data`: write identity conversations (and a held-out question set) as JSONL.

    python -m trainer data --name 小菜鸡助手 --author 小菜鸡 --n 2000 --out data/identity.jsonl \
        --eval-out data/identity_heldout.jsonl [--lang zh|en|both] [--seed 0]
"""
from __future__ import annotations

import argparse

from trainer.dataio import write_jsonl
from trainer.errors import UserError
from trainer.identity_data import Identity, check_placeholders, heldout_questions, identity_conversations


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer data", description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="the assistant's name, e.g. 小菜鸡助手")
    p.add_argument("--author", default="my creator", help="who made it")
    p.add_argument("--base-model", help="what it runs on, e.g. 书生·浦语 1.8B (mentioned in some answers)")
    p.add_argument("--lang", default="both", choices=["zh", "en", "both"])
    p.add_argument("--n", type=int, default=1000, help="number of identity conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="training JSONL to write")
    p.add_argument("--eval-out", help="held-out identity questions (JSONL) for evaluation")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise UserError("--n must be >= 1")
    for label, value in (("--name", args.name), ("--author", args.author)):
        if not value.strip():
            raise UserError(f"{label} is empty")
        check_placeholders(value, label)
    ident = Identity(args.name.strip(), args.author.strip(), args.base_model)
    records = identity_conversations(ident, args.n, lang=args.lang, seed=args.seed)
    write_jsonl(args.out, records)
    print(f"wrote {len(records)} identity conversations to {args.out}")
    if args.eval_out:
        held = heldout_questions(ident, lang=args.lang)
        write_jsonl(args.eval_out, held)
        print(f"wrote {len(held)} held-out questions to {args.eval_out}")
    return 0
