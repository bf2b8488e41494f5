"""How far int8 / int4 CPU decoding (inference/cpu_decode.py) agrees with fp32: greedy replies, token by token.

    python bench/quant_agreement.py --model smollm2 --weights int8,int4 --prompts 8 --max-tokens 64 --out agreement.json
    python bench/quant_agreement.py --model MODEL --output-layer --prompts 16 --max-tokens 48   # the output layer alone

For the first N bundled held-out prompts (trainer/data/prompts.py; half English, half Chinese) each
engine (`cpu_decode` fp32 and each of --weights, plain generate, greedy, no system prompt) replies;
reported per weight format: replies identical to fp32's, the tokens both share before they part (a
common prefix; after a first difference the replies are no longer comparable position by position),
and each pair's first difference.

`--output-layer` compares output layers alone, on the same inputs: the fp32 model's own last hidden states
over its greedy replies go through the fp32 layer, int8 (`Int8Linear`), plain int4 and int4 with the fp32
shortlist (`ShortlistHead`, what int4 decoding ships); per layer: how often its best token is fp32's, how
often fp32's best token is among the int4 shortlist, the mean L1 distance of the softmax from fp32's, and
the median ms of one call (one row, this process's threads).
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


def output_layers(loaded, prompts: list[str], max_tokens: int, repeats: int = 30) -> dict:
    """The output-layer comparison of `--output-layer` (module docstring)."""
    import statistics
    import time

    import torch

    from inference.cpu_decode import SHORTLIST, Int4Linear, Int8Linear, ShortlistHead

    model, tok = loaded.model, loaded.tokenizer
    fp32 = model.get_output_embeddings()
    states = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, output_hidden_states=True,
                                 return_dict_in_generate=True)
            states += [step[-1][0, -1] for step in out.hidden_states[1:]]     # the last layer's, after the norm
        h = torch.stack(states)
        ref = fp32(h)
        best, p_ref = ref.argmax(-1), ref.softmax(-1)
        layers = {"int8": Int8Linear(fp32), "int4": Int4Linear(fp32, residual=False),
                  "int4 shortlist": ShortlistHead(fp32)}
        res = {"states": len(states), "shortlist": SHORTLIST,
               "fp32_best_in_int4_shortlist": float((layers["int4"](h).topk(SHORTLIST, -1).indices == best[:, None])
                                                   .any(-1).float().mean())}
        for name, layer in [("fp32", fp32), *layers.items()]:
            got = layer(h)
            times = []
            for _ in range(repeats + 3):
                t = time.perf_counter()
                layer(h[:1])
                times.append(time.perf_counter() - t)
            res[name] = {"same_best": float((got.argmax(-1) == best).float().mean()),
                         "softmax_l1": float((got.softmax(-1) - p_ref).abs().sum(-1).mean()),
                         "ms": round(statistics.median(times[3:]) * 1e3, 3)}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="a model dir or a base name (smollm2, tiny)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--weights", default="int8", help="comma-separated cpu_decode choices to compare with fp32")
    p.add_argument("--output-layer", action="store_true", help="compare the output layers alone (module docstring)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    from inference import load
    from trainer.bases.registry import resolve_model
    from trainer.data.prompts import heldout_prompts

    loaded = load(str(resolve_model(a.model)), device="cpu")
    held = heldout_prompts()
    en, zh = [q for q in held if q["lang"] == "en"], [q for q in held if q["lang"] != "en"]
    prompts = en[:(a.prompts + 1) // 2] + zh[:a.prompts // 2]
    if a.output_layer:
        res = output_layers(loaded, [q["prompt"] for q in prompts], a.max_tokens)
        print("| output layer | best token = fp32's | softmax L1 from fp32 | ms / call |\n|---|---:|---:|---:|")
        for name in ("fp32", "int8", "int4", "int4 shortlist"):
            r = res[name]
            print(f"| {name} | {r['same_best']:.4f} | {r['softmax_l1']:.4f} | {r['ms']:.2f} |")
        print(f"{res['states']} hidden states; fp32's best token among the int4 top-{res['shortlist']}: "
              f"{res['fp32_best_in_int4_shortlist']:.4f}")
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
        return 0
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
