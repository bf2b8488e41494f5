"""Blend identity conversations with general ones at a fixed ratio, and record how in a manifest.

Identity-only tuning makes a model answer everything with its self-introduction and lose general
skills; the course's advice is a few thousand identity samples inside a larger general set
(2,000 in 10,000 total is an identity ratio of 0.2). `ratio` is the identity share of the final set:
`n` identity conversations get `round(n * (1 - ratio) / ratio)` general ones, sampled without
replacement from the general file (or the repo's own corpus), then everything is shuffled (seeded).
Records keep only their `messages` (the formats are normalised, extra keys such as `id` dropped); the
general ones are marked `"retain": true`, where training's `retain_kl` holds the tuned model to the base's
distribution (trainer/engine/retain.py), and keep a `base_prompt` (the prompt the base was really asked).

    python -m trainer data --name Lumi --author 小菜鸡 --n 2000 --mix general --ratio 0.2 --out data/mixed.jsonl
    python -m trainer data --name Lumi --author 小菜鸡 --n 2000 --mix my_chats.jsonl --out data/mixed.jsonl

Next to the output, `OUT.manifest.json` records sources, counts, the ratio asked for and reached, and
the seed, so a run can be traced back to its data.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from inference.atomic import write_text
from inference.assistant_file import manifest_path
from inference.errors import UserError


def check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise UserError(f"--ratio {ratio}: the identity share must be in (0, 1], e.g. 0.2 for 2,000 identity "
                        f"conversations in 10,000 total")


def general_needed(n_identity: int, ratio: float) -> int:
    """How many general conversations put `n_identity` at `ratio` of the whole."""
    check_ratio(ratio)
    return round(n_identity * (1 - ratio) / ratio)


def blend(identity: list[dict], general: list[dict], ratio: float, seed: int = 0,
          source: str = "general") -> list[dict]:
    """Identity plus the right number of general conversations (sampled from `general`), shuffled."""
    need = general_needed(len(identity), ratio)
    if need > len(general):
        raise UserError(f"{source}: has {len(general)} conversations but {len(identity)} identity ones at ratio "
                        f"{ratio} need {need} -- raise --ratio, lower --n, or pass a larger file")
    r = random.Random(seed)
    picked = r.sample(general, need)
    out = [{"messages": rec["messages"]} for rec in identity]
    out += [{"messages": rec["messages"], "retain": True,      # `retain_kl` keeps the base there
             **({"base_prompt": rec["base_prompt"]} if rec.get("base_prompt") else {})} for rec in picked]
    r.shuffle(out)
    return out


def write_manifest(out, info: dict) -> Path:
    """Write `info` as JSON next to the data file `out` (atomically); returns its path."""
    path = manifest_path(out)
    write_text(path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return path
