"""Continuous batching in fixed cache slots, for CUDA: the batcher of inference/batching.py over the
compiled, graph-replayed slot decoder of inference/slot_decode.py, with its steps pipelined.

    batcher = SlotBatcher(model, stop_ids=[...], max_batch=16, max_len=4096)
    for token_id in batcher.tokens(prompt_ids, max_new_tokens=256, temperature=0.7, top_p=0.9): ...

`ChatEngine(max_batch=N)` (inference/engine.py) uses it on CUDA for Llama-family models; elsewhere the
dynamic-cache `Batcher`. Requests, sampling, hand-over and cancellation are the base class's; this class
changes how rows join (a prefill into a free slot; a burst in one batched prefill), how a step runs (one
replay for every slot) and when the host reads the tokens (one step later: pipelined).
"""
from __future__ import annotations

import threading

import torch

from inference.batching import _END, Batcher, _Request
from inference.row_sampling import next_tokens, on_device, penalized, sampled
from inference.slot_decode import SlotDecoder


class SlotBatcher(Batcher):
    """The same requests, sampling and cancellation, decoded in fixed cache slots (inference/slot_decode.py):
    joining is a prefill into a free slot, leaving frees it, and each step is one compiled, graph-replayed
    pass over all slots. For CUDA, where the dynamic cache's per-step host work is the cost.

    Pipelined: when every running row can pick its next token on the device (greedy, or temperature /
    top-k / top-p sampling; not a repetition penalty, which needs the row's history), a step picks the
    tokens on the device, writes them straight into the next step's inputs and launches that step before
    the host reads the tokens back: the host hands step t's tokens to the consumers while the GPU runs
    step t+1. Without it the GPU waits for the host every step, and the host's share grows with the rows
    (bench/batch_decode.py, docs/BENCHMARKS.md). A row that ends has been decoded one step too many; that
    token is dropped. Other rows (a repetition penalty) make the batch step in lockstep, as before."""

    def __init__(self, model, stop_ids: list[int], max_batch: int = 8, lock: threading.Lock | None = None,
                 max_len: int = 4096, pipeline: bool = True, **decoder_opts):
        super().__init__(model, stop_ids, max_batch, lock)
        self.decoder = SlotDecoder(model, slots=max_batch, length=max_len, **decoder_opts)
        self.pipeline = pipeline
        self._free = list(range(max_batch))[::-1]
        dev = self.decoder.device
        self._live = torch.zeros(max_batch, dtype=torch.long, device=dev)    # 1 for a running slot
        pinned = dev.type == "cuda"
        self._host = [torch.zeros(max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._flight = None      # (rows, host buffer, event): a launched step whose tokens are not read yet
        self._ready = False      # decoder.tokens / pos hold every running row's next input
        self.pipelined_steps = self.lockstep_steps = 0

    def _reset(self) -> None:
        self._active, self._free = [], list(range(self.max_batch))[::-1]
        self._flight, self._ready = None, False
        self._live.zero_()

    # prompt tokens (padded) one batched prefill may hold: a burst of short prompts goes in one pass, a long
    # prompt does not make 15 short ones pay its length
    PREFILL_TOKENS = 8192

    def _admit_all(self, reqs: list[_Request]) -> None:
        ready = []
        for req in reqs:
            # the engine trims prompts to fit its context; one position is kept for the pipeline's extra step
            room = self.decoder.length - 1 - len(req.prompt)
            if req.cancelled.is_set():
                req.out.put(_END)
            elif room <= 0:
                req.out.put(ValueError(f"prompt of {len(req.prompt)} tokens does not fit the {self.decoder.length}-"
                                       f"token cache slot"))
            else:
                req.max_new_tokens = min(req.max_new_tokens, room)
                ready.append(req)
        ready.sort(key=lambda r: len(r.prompt))
        while ready:
            group = [ready.pop(0)]                 # shortest first; longer ones while the padded batch fits
            while ready and len(ready[0].prompt) * (len(group) + 1) <= self.PREFILL_TOKENS:
                group.append(ready.pop(0))
            self._prefill(group)

    def _prefill(self, group: list[_Request]) -> None:
        for req in group:
            req.slot = self._free.pop()
        with self.lock:
            logits = self.decoder.prefill_many([r.slot for r in group], [r.prompt for r in group]).float()
        for req, tok in zip(group, self._pick(group, logits)):
            req.length = len(req.prompt)
            if self._emit(req, tok):
                self._free.append(req.slot)                # ended on its first token: it never joins
                req.out.put(_END)
                continue
            self._active.append(req)
            if self._ready:                                # its first input, after any step already queued
                self.decoder.tokens[req.slot, 0] = req.generated[-1]
                self.decoder.pos[req.slot] = req.length
                self._live[req.slot] = 1

    def _decode(self, reqs: list[_Request]) -> torch.Tensor:
        tokens, positions = [0] * self.max_batch, [0] * self.max_batch     # free slots decode a dummy token
        for r in reqs:
            tokens[r.slot], positions[r.slot] = r.generated[-1], r.length
        window = self.decoder.window(max(r.length for r in reqs) + 1)
        with self.lock:
            logits = self.decoder.decode(tokens, positions, window)
            return logits[torch.tensor([r.slot for r in reqs], device=logits.device)].float()

    def _step(self) -> None:
        reqs = self._active
        if not self.pipeline or any(map(penalized, reqs)):
            self._land()
            if self._active:
                self._ready = False
                self.lockstep_steps += 1
                super()._step()
            return
        self.peak = max(self.peak, len(reqs))
        dec = self.decoder
        if not self._ready:          # after a lockstep step or a reset: the inputs come from the host once
            self._live.zero_()
            self._live[on_device([r.slot for r in reqs], dec.device, torch.long)] = 1
            dec.tokens.zero_()
            dec.pos.zero_()
            for r in reqs:
                dec.tokens[r.slot, 0], dec.pos[r.slot] = r.generated[-1], r.length
        window = dec.window(max(r.length for r in reqs) + 1)
        host = self._host[self.pipelined_steps % 2]
        with self.lock, torch.no_grad():
            logits = dec.replay(window)
            nxt = logits.argmax(-1)
            hot = [r for r in reqs if sampled(r)]
            if hot:                  # sampled rows: each its own settings and generator, batched
                at = on_device([r.slot for r in hot], logits.device, torch.long)
                nxt[at] = next_tokens(logits[at], hot)
            dec.tokens[:, 0] = nxt
            dec.pos.add_(self._live)
            host.copy_(nxt, non_blocking=True)
            event = torch.cuda.Event() if dec.device.type == "cuda" else None
            if event is not None:
                event.record()
        self._ready = True
        self.pipelined_steps += 1
        for r in reqs:
            r.length += 1
        landing, self._flight = self._flight, (list(reqs), host, event)
        if landing is not None:
            self._hand_over(landing)

    def _land(self) -> None:
        """Hand over the tokens of the step still in flight (before a lockstep step)."""
        landing, self._flight = self._flight, None
        if landing is not None:
            self._hand_over(landing)

    def _hand_over(self, flight) -> None:
        rows, host, event = flight
        if event is not None:
            event.synchronize()
        toks = host.tolist()
        active = set(map(id, self._active))     # rows that ended or left since stay silent
        ended = []
        for r in rows:
            if id(r) in active and self._emit(r, toks[r.slot]):
                ended.append(r)
        if ended:
            gone = set(map(id, ended))
            self._keep([i for i, r in enumerate(self._active) if id(r) not in gone])
            for r in ended:
                r.out.put(_END)

    def _keep(self, rows: list[int]) -> None:
        kept = set(rows)
        for i, r in enumerate(self._active):
            if i not in kept:
                self._free.append(r.slot)
                self._live[r.slot] = 0           # a freed slot stops advancing (its position stays in range)
                self.decoder.pos[r.slot] = 0
        self._active = [self._active[i] for i in rows]
        if not self._active:
            self._flight = None                  # only ended rows were in it
