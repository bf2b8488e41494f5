"""inference/row_sampling.py: a batch of rows sampling each its own way gives transformers' distributions
(repetition penalty, temperature, top-k, top-p, in generate's order), exact draws from them, and the same
seeded draw for a row alone or in any batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from inference.row_sampling import next_tokens, penalize, probabilities


@dataclass
class Row:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None
    seen: tuple = ()


def _transformers(row: Row, logits: torch.Tensor) -> torch.Tensor:
    """The row's probabilities through transformers' own processors, as generate builds them."""
    procs = LogitsProcessorList()
    if row.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(row.repetition_penalty))
    procs.append(TemperatureLogitsWarper(row.temperature))
    if row.top_k:
        procs.append(TopKLogitsWarper(row.top_k))
    if row.top_p < 1.0:
        procs.append(TopPLogitsWarper(row.top_p))
    ids = torch.tensor([list(row.seen) or [0]])
    return torch.softmax(procs(ids, logits[None].clone()), dim=-1)[0]


ROWS = [Row(0.7, 20, 0.9, 1.3, seen=(3, 5, 5, 99)), Row(1.0), Row(1.3, 5), Row(0.5, 0, 0.8), Row(1.0, 50, 0.95)]


def test_each_row_gets_transformers_distribution():
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), 300) * 3
    got = probabilities(penalize(logits, ROWS, lambda r: list(r.seen)), ROWS)
    for i, row in enumerate(ROWS):
        torch.testing.assert_close(got[i], _transformers(row, logits[i]), rtol=1e-5, atol=1e-6)
    assert (got[2] > 0).sum() == 5 and (got[1] > 0).sum() == 300


def test_greedy_rows_take_the_argmax_and_a_penalty_changes_it():
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0], [0.0, 2.0, 1.9, -1.0]])
    rows = [Row(), Row(repetition_penalty=2.0, seen=(1,))]
    assert next_tokens(logits, rows, lambda r: list(r.seen)).tolist() == [1, 2]


def test_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1, 1e-9]))
    gen = torch.Generator().manual_seed(1)
    row = Row(1.0, generator=gen)
    n = 8000
    draws = torch.cat([next_tokens(logits[None], [row]) for _ in range(n)])
    freq = torch.bincount(draws, minlength=5).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0]), atol=0.02, rtol=0)


def test_a_seeded_row_draws_the_same_alone_and_in_a_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 500)

    def draws(batch: bool) -> list[int]:
        rows = [Row(1.0, 40, 0.9, generator=torch.Generator().manual_seed(s)) for s in (7, 8, 9)]
        if batch:
            return [next_tokens(logits, rows)[1].item() for _ in range(20)]
        return [next_tokens(logits[1:2], rows[1:2])[0].item() for _ in range(20)]
    assert draws(True) == draws(False)
    assert len(set(draws(True))) > 1
