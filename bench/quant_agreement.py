"""How far int8 / int4 CPU decoding (inference/cpu_decode.py) agrees with fp32: greedy replies, token by token.

    python bench/quant_agreement.py --model smollm2 --weights int8,int4 --prompts 8 --max-tokens 64 --out agreement.json

For the first N bundled held-out prompts (trainer/data/prompts.py; half English, half Chinese) each
engine (`cpu_decode` fp32 and each of --weights, plain generate, greedy, no system prompt) replies;
reported per weight format: replies identical to fp32's, the tokens both share before they part (a
common prefix; after a first difference the replies are no longer comparable position by position),
and each pair's first difference.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(ref, got)]
    return {"identical": sum(a == b for a, b in zip(ref, got)), "replies": len(ref),
            "shared_prefix_tokens": sum(firsts), "fp32_tokens": sum(len(a) for a in ref), "first_difference": firsts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="a model dir or a base name (smollm2, tiny)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--weights", default="int8", help="comma-separated cpu_decode choices to compare with fp32")
    p.add_argument("--out")
    a = p.parse_args(argv)
    from inference import load
    from trainer.bases.registry import resolve_model
    from trainer.data.prompts import heldout_prompts

    loaded = load(str(resolve_model(a.model)), device="cpu")
    held = heldout_prompts()
    en, zh = [q for q in held if q["lang"] == "en"], [q for q in held if q["lang"] != "en"]
    prompts = en[:(a.prompts + 1) // 2] + zh[:a.prompts // 2]
    replies, texts = {}, {}
    kinds = [w.strip() for w in a.weights.split(",") if w.strip()]
    for choice in ["fp32", *kinds]:
        engine = loaded.engine(fast_decode=False, cpu_decode=choice)
        replies[choice] = [engine.greedy_ids([{"role": "user", "content": q["prompt"]}], a.max_tokens, system_prompt="")
                           for q in prompts]
        texts[choice] = [loaded.tokenizer.decode(r, skip_special_tokens=True) for r in replies[choice]]
    res = {"model": a.model, "max_tokens": a.max_tokens,
           **{k: agreement(replies["fp32"], replies[k]) for k in kinds},
           "pairs": [{"prompt": q["prompt"], **{k: texts[k][i] for k in texts}} for i, q in enumerate(prompts)]}
    for k in kinds:
        print(json.dumps({"weights": k, **res[k]}))
    for pair in res["pairs"]:
        print(json.dumps(pair, ensure_ascii=False))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
