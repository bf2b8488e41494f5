"""Conversations -> token ids with assistant-only labels, optional packing, and the batch collator.

Packing concatenates several short conversations into one row of at most `max_length` tokens.
Position ids restart at 0 for every conversation and no attention mask is passed, which makes
transformers build a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`), so
no token attends across a conversation boundary (tests/test_train_packing.py checks that a
conversation's logits are the same alone and inside a packed row). Fewer rows, no padding waste.
`packing: auto` packs when that at least halves the number of rows, i.e. when conversations are
short next to `max_length` -- the usual case for identity data.
"""
from __future__ import annotations

import hashlib
import json
import math

import torch

from inference.chat_format import IGNORE_INDEX, encode_chat, with_system
from trainer.data.formats import load_conversations
from inference.errors import UserError
from trainer.engine.retain import base_view, retain_marks


def encode_files(paths, tokenizer, max_length: int, system_prompt: str | None,
                 retain: bool = False) -> tuple[list[dict], dict]:
    """Encoded samples from every file, plus counts (samples, truncated, dropped). RETAIN: also each
    sample's `retain` marks and, where the base answered another prompt, its inputs (`retain_kl` on)."""
    if not paths:
        raise UserError("no training data: pass --data FILE.jsonl (make one with `python -m trainer data`)")
    samples, stats = [], {"samples": 0, "truncated": 0, "dropped": 0}
    for path in paths:
        for record in load_conversations(path):
            full = encode_chat(tokenizer, with_system(record["messages"], system_prompt))
            if len(full["input_ids"]) > max_length:
                stats["truncated"] += 1
            ids, labels = full["input_ids"][:max_length], full["labels"][:max_length]
            if all(t == IGNORE_INDEX for t in labels):
                stats["dropped"] += 1      # nothing left to learn after truncation
                continue
            sample = {"input_ids": ids, "labels": labels}
            if retain:
                sample.update(retain_marks(record, tokenizer, sample, max_length, system_prompt))   # retain.py
            samples.append(sample)
    stats["samples"] = len(samples)
    if not samples:
        raise UserError(f"{paths[0]}: no trainable samples (all answers truncated away? raise max_length)")
    return samples, stats


def pack(samples: list[dict], max_length: int) -> list[dict]:
    """Greedy first-fit packing in the given order (deterministic for a given seed/order). Conversations
    whose KL reference is the base on another prompt (`base_input_ids`, trainer/engine/retain.py) get a
    parallel base row made of the same conversations in the same order."""
    keys = ["input_ids", "labels", "position_ids", "retain"]
    if any("base_input_ids" in s for s in samples):
        keys += ["base_input_ids", "base_labels", "base_position_ids", "base_retain"]
    rows: list[dict] = []
    current = {k: [] for k in keys}
    for s in samples:
        n = len(s["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            rows.append(current)
            current = {k: [] for k in keys}
        current["input_ids"] += s["input_ids"]
        current["labels"] += s["labels"]
        current["retain"] += s.get("retain", [False] * n)
        current["position_ids"] += list(range(n))
        if "base_input_ids" in current:
            base = base_view(s)
            current["base_input_ids"] += base["input_ids"]
            current["base_labels"] += base["labels"]
            current["base_retain"] += base["retain"]
            current["base_position_ids"] += list(range(len(base["input_ids"])))
    if current["input_ids"]:
        rows.append(current)
    return rows


MIN_STEPS = 50     # fewer optimizer steps than this and a run learns little: warn, and never pack into it


def optimizer_steps(rows: int, batch: int, epochs: float, max_steps: int = -1) -> int:
    """How many optimizer steps a run over ROWS makes (BATCH = micro-batch x accumulation x processes)."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(math.ceil(rows / batch) * epochs))


def choose_packing(setting, samples: list[dict], max_length: int, batch: int = 1, epochs: float = 1.0,
                   max_steps: int = -1) -> tuple[bool, list[dict]]:
    """Resolve `packing: true | false | auto` into (packed?, rows to train on).

    auto packs when that at least halves the rows AND the packed run still makes MIN_STEPS optimizer
    steps: packing 400 short chats into 22 rows left a real run with 4 steps, which learns nothing."""
    if setting is False:
        return False, samples
    rows = pack(samples, max_length)
    if setting is True:
        return True, rows
    if len(rows) * 2 <= len(samples) and optimizer_steps(len(rows), batch, epochs, max_steps) >= MIN_STEPS:
        return True, rows
    return False, samples


def digest(rows: list[dict]) -> str:
    """A fingerprint of exactly what is trained on, in order: a resumed run must see the same rows."""
    h = hashlib.sha256()
    for row in rows:
        marked = [row["retain"]] if any(row.get("retain", ())) else []     # unmarked data: the old digest
        h.update(json.dumps([row["input_ids"], row["labels"], *marked]).encode())
    return h.hexdigest()[:16]


class Collator:
    """Right-pads a batch; counts the real tokens it has served (for tokens/s in the log).

    `rows` / `width` keep the shapes static for a compiled model (`collator_for`): every batch gets
    at least `rows` rows and `width` tokens. The rows added to an epoch's short last batch carry no
    label (-100 everywhere), so the loss (a mean over labelled tokens) and the gradients are those of
    the real rows; torch.compile never meets a new batch shape and never recompiles mid-run."""

    def __init__(self, pad_id: int, packed: bool, rows: int | None = None, width: int | None = None,
                 retain: bool = False):
        self.pad_id = pad_id
        self.retain = retain       # also return the per-token `retain` marks (trainer/engine/retain.py)
        self.packed = packed
        self.rows, self.width = rows, width
        self.tokens_seen = 0

    def __call__(self, batch: list[dict]) -> dict:
        width = max(max(len(b["input_ids"]) for b in batch), self.width or 0)
        n_rows = max(len(batch), self.rows or 0)
        ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n_rows, width), dtype=torch.long)
        mask[len(batch):, 0] = 1       # a padding row attends to its first token: an all-masked row is NaN
        pos = torch.zeros((n_rows, width), dtype=torch.long)      # in some sdpa kernels, and 0 x NaN = NaN
        keep = torch.zeros((n_rows, width), dtype=torch.bool)
        base = self.retain and any("base_input_ids" in b for b in batch)
        pos[len(batch):] = torch.arange(width)                    # packed: a padding row is its own segment
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
            if self.retain:
                keep[i, :n] = torch.tensor(b.get("retain", [False] * n))
            if self.packed:
                pos[i, :n] = torch.tensor(b["position_ids"])
                pos[i, n:] = torch.arange(width - n)   # the padding tail is its own segment
            self.tokens_seen += n
        out = {"input_ids": ids, "labels": labels}
        out.update({"position_ids": pos} if self.packed else {"attention_mask": mask})
        if base:        # the base's inputs where its reference prompt differs (trainer/engine/retain.py)
            views = [base_view(b) for b in batch]
            views += [{"input_ids": [self.pad_id], "labels": [IGNORE_INDEX], "retain": [False],
                       "position_ids": [0]}] * (n_rows - len(batch))
            other = Collator(self.pad_id, self.packed, retain=True)(views)
            out.update({f"base_{k}": v for k, v in other.items()})
        return {**out, "retain": keep} if self.retain else out


def collator_for(cfg, pad_id: int, packed: bool) -> Collator:
    """The training collator. With `compile` every micro-batch has `batch_size` rows (and packed rows
    `max_length` tokens, which they nearly fill anyway): one shape for the whole run, where a short
    last batch of an epoch used to cost a recompile of every compiled block (7 s on an H100)."""
    retain = getattr(cfg, "retain_kl", 0) > 0
    if not getattr(cfg, "compile", False):
        return Collator(pad_id, packed, retain=retain)
    return Collator(pad_id, packed, rows=cfg.batch_size, width=cfg.max_length if packed else None, retain=retain)
