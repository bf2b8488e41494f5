"""Next tokens for a batch of rows that each sample their own way: a few batched ops, not a loop per row.

    toks = next_tokens(logits, rows, history)      # logits [R, V]; rows: temperature, top_k, top_p,
                                                   # repetition_penalty, generator (inference/batching.py)

Each row is greedy or samples with its own temperature / top-k / top-p and its own seeded generator; a
repetition penalty needs the row's tokens so far (`history(row)`). The distribution is transformers'
(`RepetitionPenaltyLogitsProcessor`, then `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`,
in generate's order); the draw is the exponential race -- argmax(p / E) with E ~ Exp(1) from the row's own
generator -- an exact sample from p that needs one noise kernel per row and one argmax for all of them.

Why by hand: transformers' processors take one setting for the whole batch, and calling them row by row
launched ~10 small kernels per sampled row per step: at 16 sampled rows that host work, not the GPU, set a
step's time (bench/batch_decode.py --temperature 0.7, docs/BENCHMARKS.md). A row's draw depends only on its
logits and its generator, so a seeded reply is the same alone and in any batch.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Setting(NamedTuple):
    """One row's sampling settings, for callers without a request object (inference/fast_decode.py)."""
    temperature: float
    top_k: int = 0
    top_p: float = 1.0


def penalized(row) -> bool:
    return row.repetition_penalty not in (None, 1.0)


def sampled(row) -> bool:
    return bool(row.temperature) and row.temperature > 0


def penalty(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Seen tokens' scores under repetition penalty P, as transformers' RepetitionPenaltyLogitsProcessor:
    divided where positive, multiplied where negative."""
    return torch.where(scores < 0, scores * p, scores / p)


def on_device(values: list, device: torch.device, dtype=None) -> torch.Tensor:
    """A small host list as a tensor on DEVICE without stalling the host: on CUDA a copy from pageable
    memory waits for the work already queued (the step in flight, when steps are pipelined), so the list
    goes through pinned memory and a non-blocking copy."""
    t = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def penalize(logits: torch.Tensor, rows: list, history: Callable[[object], list[int]]) -> torch.Tensor:
    """LOGITS [R, V] (float) with each penalised row's seen tokens scaled as transformers does: divided
    by the penalty where positive, multiplied where negative. Returns a new tensor when any row is penalised."""
    marked = [i for i, r in enumerate(rows) if penalized(r)]
    if not marked:
        return logits
    logits = logits.clone()
    for i in marked:
        ids = on_device(history(rows[i]), logits.device, torch.long)
        logits[i, ids] = penalty(logits[i, ids], rows[i].repetition_penalty)
    return logits


def probabilities(logits: torch.Tensor, rows: list) -> torch.Tensor:
    """What each row samples from [R, V]: LOGITS (float) through its temperature, top-k and top-p."""
    dev, vocab = logits.device, logits.shape[-1]
    x = logits / on_device([float(r.temperature) for r in rows], dev)[:, None]
    ks = [min(r.top_k or 0, vocab) for r in rows]
    if any(ks):
        top = x.topk(max(ks), dim=-1).values                                   # [R, kmax], descending
        k = on_device([k or 1 for k in ks], dev, torch.long)
        floor = top.gather(1, (k - 1)[:, None])                                # each row's k-th best
        floor = torch.where(on_device(ks, dev, torch.long)[:, None] > 0, floor, float("-inf"))
        x = x.masked_fill(x < floor, float("-inf"))
    ps = [r.top_p if r.top_p is not None and r.top_p < 1.0 else 1.0 for r in rows]
    if any(p < 1.0 for p in ps):
        ordered, order = x.sort(dim=-1)                                        # ascending, as transformers
        cut = ordered.softmax(-1).cumsum(-1) <= (1 - on_device([float(p) for p in ps], dev))[:, None]
        cut[:, -1] = False                                                     # keep at least the best one
        x = x.masked_fill(torch.zeros_like(cut).scatter(1, order, cut), float("-inf"))
    return x.softmax(-1)


def sample_rows(logits: torch.Tensor, rows: list) -> torch.Tensor:
    """One draw per row of LOGITS [R, V] (float), every row with a temperature > 0; ids [R] on the device."""
    probs = probabilities(logits, rows)
    dev, vocab = logits.device, logits.shape[-1]
    noise = torch.stack([torch.empty(vocab, device=dev).exponential_(generator=r.generator) for r in rows])
    return (probs / noise.clamp_min_(1e-30)).argmax(-1)


def next_tokens(logits: torch.Tensor, rows: list, history: Callable[[object], list[int]] | None = None) -> torch.Tensor:
    """Every row's next token id [R] (device): penalties, then argmax for greedy rows and a draw for the others."""
    logits = logits.float()
    if history is not None:
        logits = penalize(logits, rows, history)
    out = logits.argmax(-1)
    hot = [i for i, r in enumerate(rows) if sampled(r)]
    if hot:
        at = on_device(hot, logits.device, torch.long)
        out[at] = sample_rows(logits[at], [rows[i] for i in hot])
    return out
