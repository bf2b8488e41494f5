"""`python -m trainer data`: write identity conversations as JSONL, with a held-out question set,
optionally mixed with general chat, plus a manifest saying what went in.

    python -m trainer data --name 小菜鸡助手 --author 小菜鸡 --n 2000 --out data/identity.jsonl \
        --eval-out data/identity_heldout.jsonl [--lang zh|en|both] [--seed 0] [--base-model "书生·浦语 1.8B"]
    python -m trainer data --name Lumi --author 小菜鸡 --n 2000 --mix general --ratio 0.2 --out data/mixed.jsonl
    python -m trainer data --name Lumi --author 小菜鸡 --n 2000 --mix my_chats.jsonl --out data/mixed.jsonl
    python -m trainer data --name Lumi --author 小菜鸡 --n 200 --mix self --model smollm2 --ratio 0.5 --out data/me.jsonl
    python -m trainer data --general 5000 --out data/general.jsonl     # the general corpus alone

`--mix FILE` takes OpenAI messages (JSONL or JSON array), Alpaca or ShareGPT; `--mix general` uses the
repo's own corpus (trainer/data/general.py); `--mix self --model BASE` the bundled general prompts
answered by BASE itself (trainer/data/self_distill.py: the right choice for a real model; a base that speaks no
Chinese is asked each Chinese prompt's English twin, `--twins`). `--ratio` is the identity share of the result (default
0.2). The held-out file (`--eval-out`) holds question forms never used in training, each with the
strings a correct answer must contain: `{"messages": [...], "expect": [...], "kind": ..., "lang": ...}`.
Check the result with `python -m trainer check-data OUT` and look at it with `show-data`.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from trainer.data.formats import load_conversations, write_jsonl
from inference.errors import UserError
from trainer.data.general import general_conversations
from trainer.data.identity import Identity, check_placeholders, form_of, heldout_questions, identity_conversations
from inference.assistant_file import manifest_path
from trainer.data.prompts import train_prompts
from trainer.data.mix import blend, check_ratio, general_needed, write_manifest
from trainer.data.self_distill import SYSTEM_PROMPT as SELF_SYSTEM_PROMPT, TWINS

DEFAULT_RATIO = 0.2


def build_parser() -> argparse.ArgumentParser:
    # the whole first paragraph: its first line stops mid-sentence
    p = argparse.ArgumentParser(prog="python -m trainer data", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", help="the assistant's name, e.g. 小菜鸡助手")
    p.add_argument("--author", help="who made it, e.g. 小菜鸡 (required with --name)")
    p.add_argument("--base-model", help="what it runs on, e.g. 书生·浦语 1.8B (mentioned in some answers)")
    p.add_argument("--lang", default="both", choices=["zh", "en", "both"])
    p.add_argument("--n", type=int, default=1000, help="number of identity conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="training JSONL to write")
    p.add_argument("--eval-out", help="held-out identity questions (JSONL) for evaluation")
    p.add_argument("--mix", metavar="FILE|general|self", help="blend in general conversations from FILE, the "
                   "repo's own corpus ('general'), or the base's own answers to bundled prompts ('self')")
    p.add_argument("--model", help="with --mix self: the base model (dir or embedded name, e.g. smollm2)")
    p.add_argument("--system-prompt", default=SELF_SYSTEM_PROMPT,
                   help="with --mix self: the system prompt the answers are generated under -- the one the "
                        f"run trains and serves with (default: {SELF_SYSTEM_PROMPT!r}, as the smollm2 preset)")
    p.add_argument("--twins", choices=TWINS, default="auto",
                   help="with --mix self: ask the base each Chinese prompt's English twin and train the Chinese "
                        "prompt on its English answer (auto: when the base speaks no Chinese, as the embedded "
                        "smollm2; its model dir's gguf_source.json says)")
    p.add_argument("--ratio", type=float, help=f"identity share of the mixed set (default {DEFAULT_RATIO})")
    p.add_argument("--general", type=int, metavar="N", help="write N general conversations alone (no identity)")
    return p


def _check_args(args) -> None:
    if args.general is not None:
        extra = [flag for flag, v in (("--name", args.name), ("--mix", args.mix), ("--eval-out", args.eval_out))
                 if v is not None]
        if extra:
            raise UserError(f"--general writes the general corpus alone; drop {', '.join(extra)} "
                            f"(to blend it with identity data use --mix general)")
        if args.general < 1:
            raise UserError("--general must be >= 1")
        return
    if not args.name or not args.author:
        raise UserError("--name and --author are required (or --general N for the general corpus alone)")
    for label, value in (("--name", args.name), ("--author", args.author), ("--base-model", args.base_model)):
        if value is not None and not value.strip():
            raise UserError(f"{label} is empty")
        if value:
            check_placeholders(value, label)
    if args.n < 1:
        raise UserError("--n must be >= 1")
    if args.ratio is not None:
        if not args.mix:
            raise UserError("--ratio needs --mix FILE|general (it sets the identity share of the mixed set)")
        check_ratio(args.ratio)
    if (args.mix == "self") != bool(args.model):
        raise UserError("--mix self needs --model BASE (the model that answers), and --model is only for --mix self")
    if args.twins != "auto" and args.mix != "self":
        raise UserError(f"--twins {args.twins} is only for --mix self (it picks what the base is asked)")
    paths = [Path(p).resolve() for p in (args.out, args.eval_out, args.mix) if p and p not in ("general", "self")]
    if len(set(paths)) != len(paths):
        raise UserError("--out, --eval-out and --mix must be different files")


def _general_only(args) -> int:
    records = general_conversations(args.general, seed=args.seed, unique=True)
    write_jsonl(args.out, records)
    write_manifest(args.out, {"output": Path(args.out).name, "total": len(records), "seed": args.seed,
                              "sources": [{"kind": "general", "from": "general", "count": len(records)}]})
    print(f"wrote {len(records)} general conversations to {args.out}")
    return 0


def _self_mix(args, need: int) -> tuple[list[dict], bool]:
    """NEED conversations from the base's own answers to the bundled prompts (all of them answered once,
    then cached), as many in Chinese as the identity data's Chinese share: identity chats in a language
    with no general chat beside them teach the model to answer every question in it with its name.
    Also whether the Chinese prompts were asked in their English twins (`--twins`)."""
    from trainer.bases.registry import resolve_model
    from trainer.data.self_distill import asked, self_conversations, use_twins

    prompts = train_prompts(args.lang)
    model_dir = resolve_model(args.model)
    twins = use_twins(model_dir, args.twins)
    convs = self_conversations(model_dir, prompts, args.system_prompt or None, twins=twins)
    if not convs:
        raise UserError(f"--mix self: {args.model} finished none of {len(prompts)} bundled prompts -- use a chat "
                        "model, or --mix FILE with conversations of your own")
    lang = {p["prompt"]: p["lang"] for p in prompts}
    ask = {p["prompt"]: asked(p, twins) for p in prompts}
    for conv in convs:        # answered as another prompt (its English twin): retain_kl's reference is
        q = conv["messages"][0]["content"]          # the base after that prompt (trainer/engine/retain.py)
        if ask[q] != q:
            conv["base_prompt"] = ask[q]
    by_lang = {lg: [c for c in convs if lang[c["messages"][0]["content"]] == lg] for lg in ("zh", "en")}
    r = random.Random(args.seed)
    for group in by_lang.values():
        r.shuffle(group)
    zh_share = {"zh": 1.0, "en": 0.0}.get(args.lang, 0.5)
    n_zh = min(len(by_lang["zh"]), round(need * zh_share))
    n_en = min(len(by_lang["en"]), need - n_zh)
    n_zh = min(len(by_lang["zh"]), need - n_en)        # fill from Chinese when English runs short
    return by_lang["zh"][:n_zh] + by_lang["en"][:n_en], twins


def _forms_used(records: list[dict], langs: list[str]) -> dict[str, int]:
    used = {lg: set() for lg in langs}
    for rec in records:
        for m in rec["messages"]:
            if m["role"] == "user":
                for lg in langs:
                    form = form_of(m["content"], lg)
                    if form:
                        used[lg].add(form)
    return {lg: len(forms) for lg, forms in used.items()}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    if args.general is not None:
        return _general_only(args)
    ident = Identity(args.name.strip(), args.author.strip(), (args.base_model or "").strip() or None)
    identity = identity_conversations(ident, args.n, lang=args.lang, seed=args.seed)
    langs = ["zh", "en"] if args.lang == "both" else [args.lang]
    keys = {json.dumps(r["messages"], ensure_ascii=False) for r in identity}
    sources = [{"kind": "identity", "from": "trainer/data/identity.py", "count": len(identity),
                "name": ident.name, "author": ident.author, "base_model": ident.base_model, "lang": args.lang,
                "question_forms": _forms_used(identity, langs), "exact_duplicates": len(identity) - len(keys)}]
    records, ratio = identity, None
    if args.mix:
        ratio = DEFAULT_RATIO if args.ratio is None else args.ratio
        if args.mix == "general":
            general = general_conversations(general_needed(len(identity), ratio), seed=args.seed + 1, unique=True)
        elif args.mix == "self":
            general, twins = _self_mix(args, general_needed(len(identity), ratio))
            if general_needed(len(identity), ratio) > len(general):
                ratio = len(identity) / (len(identity) + len(general))
                print(f"the base finished {len(general)} answers: using them all (identity share {ratio:.2f})")
        else:
            general = load_conversations(args.mix)
        records = blend(identity, general, ratio, seed=args.seed, source=args.mix)
        sources.append({"kind": "general", "from": args.mix, "count": len(records) - len(identity),
                        "available": None if args.mix == "general" else len(general)})
        if args.mix == "self":
            sources[-1].update({"model": str(args.model), "system_prompt": args.system_prompt,
                                "chinese_asked_in_english": twins})
    held = heldout_questions(ident, lang=args.lang) if args.eval_out else []

    write_jsonl(args.out, records)
    if args.eval_out:
        write_jsonl(args.eval_out, held)
    info = {"output": Path(args.out).name, "total": len(records), "seed": args.seed, "sources": sources,
            "ratio": {"requested": ratio, "actual": round(len(identity) / len(records), 4)},
            "heldout": {"path": str(args.eval_out), "count": len(held)} if args.eval_out else None}
    write_manifest(args.out, info)

    forms = " + ".join(f"{v} {lg}" for lg, v in sources[0]["question_forms"].items())
    print(f"wrote {len(records)} conversations to {args.out}: {len(identity)} identity ({forms} question forms)"
          + (f", {len(records) - len(identity)} general from {args.mix} (identity share "
             f"{info['ratio']['actual']:.3f})" if args.mix else ""))
    if ratio is not None and abs(info["ratio"]["actual"] - ratio) > 0.01:
        print(f"note: the identity share is {info['ratio']['actual']:.3f}, not {ratio}: too few conversations "
              f"to hit the ratio closer (raise --n)")
    if args.eval_out:
        print(f"wrote {len(held)} held-out questions to {args.eval_out}")
    print(f"manifest: {manifest_path(args.out)}")
    return 0
