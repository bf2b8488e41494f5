"""The bundled general prompts (trainer/data/general_prompts.json): zh and en facts, writing, advice,
code, reasoning and explanations. `train` ones are answered by the base itself for `--mix self`
(trainer/data/self_distill.py); `heldout` ones are never trained on and measure leakage and retention
(trainer/evaluation/evaluate.py), about twenty with the fact a right answer contains (`expect`). Among
the train prompts, 40 ask for first-person writing (self-introductions, letters, notes): the base writes
"My name is [Your Name]" there, and without them the tuned model wrote its own name into such texts
(docs/BENCHMARKS.md, "Session 11: first-person writing in the self-answers").
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("general_prompts.json")


@lru_cache(maxsize=1)
def _load() -> dict:
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))


def train_prompts(lang: str = "both") -> list[dict]:
    """{"lang", "kind", "prompt"} for self-distillation, in file order, of one language or both."""
    return [dict(p) for p in _load()["train"] if lang == "both" or p["lang"] == lang]


def heldout_prompts() -> list[dict]:
    """{"lang", "kind", "prompt", "expect"?}: never trained on; the same for every run."""
    return [dict(p) for p in _load()["heldout"]]
