"""Continuous batching: concurrent chat requests share one running batch, each streaming its own tokens.

    batcher = Batcher(model, stop_ids=[...], max_batch=8)
    for token_id in batcher.tokens(prompt_ids, max_new_tokens=256, temperature=0.7, top_p=0.9): ...

`ChatEngine(max_batch=N)` (inference/engine.py) serves every `stream_chat` through this, so the Gradio
app, the Streamlit demo and the OpenAI-compatible API answer several users at once instead of one after
another. Batch-1 decoding reads every weight for one token; a batch of B reads them once for B tokens,
so B streams cost little more than one per step (docs/BENCHMARKS.md, "Serving many at once").

How it works: one worker thread owns the model. Each turn it admits the waiting requests (each a batch-1
prefill into its own KV cache, which is then left-padded and stacked onto the running batch's cache),
then makes one decode step for every running request: a single forward pass of shape (B, 1) with a 2-D
attention mask that hides each row's padding and per-row position ids, so a row's logits are the ones it
would get alone. Rows that end (stop token, token cap, consumer gone) leave the batch at once; columns
that only padding occupies are cut off. Each row samples with its own settings and its own generator
(greedy, or temperature / top-k / top-p / repetition penalty as transformers applies them:
inference/row_sampling.py).

transformers' `generate` cannot do this (a call's batch is fixed from start to end) and its own
continuous-batching manager needs paged attention kernels; this works on any device with the plain
`DynamicCache` of Llama-family models. The worker holds the engine lock only during one step, so a
training-time sample chat or `greedy_ids` on the same model waits at most one step.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from inference.device import use_decode_threads
from inference.row_sampling import next_tokens

_END = object()          # put on a request's queue after its last token
# Tokens reach a consumer at most this often (the first one at once): each hand-over wakes the consumer's
# thread, and with 16 rows on a GPU step of ~3 ms those wake-ups, not the GPU, set the pace (bench/batch_decode.py).
# 10 ms of grouping is below what a reader of a streamed reply notices.
FLUSH_S = 0.01


@dataclass
class _Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    generator: torch.Generator | None
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    length: int = 0          # real (unpadded) tokens of this row in the KV cache
    slot: int = -1           # SlotBatcher: the cache slot this request decodes in
    pending: list[int] = field(default_factory=list)     # decoded, not yet handed over
    flushed: float = 0.0     # when tokens were last handed over

    def history(self) -> list[int]:
        return self.prompt + self.generated


def supports(model) -> bool:
    """Whether this model's cache is the plain per-layer key/value kind the batcher can pad and stack
    (Llama, Qwen2 without sliding windows, Mistral ...); others are served one at a time by generate."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:        # a config DynamicCache cannot read: not a model family we batch
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class Batcher:
    def __init__(self, model, stop_ids: list[int], max_batch: int = 8, lock: threading.Lock | None = None,
                 prefill_model=None, row_step=None):
        self.model = model
        # the compiled step that stands in for the model's forward at each decode step (inference/row_step.py;
        # the engine gives one on the CPU to its int4 / int8 copy), or None: the model's own forward
        self.row_step = row_step
        # the model a new request's prompt is read with (default: MODEL). The engine passes the fp32 model when
        # MODEL is its int4 decode copy: torch's int4 kernel reads 512 prompt tokens 1.43x slower than fp32's GEMM,
        # while one token a step runs 2x faster (bench/cpu_prefill.py, docs/BENCHMARKS.md "Session 14")
        self.prefill_model = prefill_model or model
        self.stop = set(stop_ids)
        self.max_batch = max_batch
        self.lock = lock or threading.Lock()
        self._waiting: queue.Queue[_Request] = queue.Queue()
        self._active: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None        # (B, T) 1 = real token, 0 = left padding
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.threads = 0                     # OpenMP threads the loop decodes with (set when it starts)
        self._start_lock = threading.Lock()
        self.peak = 0            # the most rows ever decoded in one step (tests, benchmarks)

    # --- the consumer side -------------------------------------------------------------------------
    def tokens(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """The reply's token ids as they are decoded (stop token excluded). Closing the iterator (a
        consumer that goes away) takes the request out of the batch at the next step."""
        chunks = self.token_chunks(prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        try:
            for chunk in chunks:
                yield from chunk
        finally:
            chunks.close()

    def token_chunks(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                     top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None) -> Iterator[list[int]]:
        """Like `tokens`, but each item is every token decoded since the consumer last asked: the first
        token alone, then what the worker hands over every FLUSH_S (more once the consumer falls behind),
        so a busy server does its per-reply work (detokenising, one SSE event) once per wake-up instead of
        once per token."""
        gen = None
        if temperature and temperature > 0:
            gen = torch.Generator(device=self.model.device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        req = _Request(list(prompt), max_new_tokens, temperature, top_p, top_k or 0, repetition_penalty, gen)
        self._ensure_worker()
        self._waiting.put(req)
        self._wake.set()
        try:
            ended = False
            while not ended:
                items = [req.out.get()]
                while True:
                    try:
                        items.append(req.out.get_nowait())
                    except queue.Empty:
                        break
                chunk = []
                for item in items:
                    if item is _END:
                        ended = True
                        break
                    if isinstance(item, BaseException):
                        raise item
                    chunk.extend(item)
                if chunk:
                    yield chunk
        finally:
            req.cancelled.set()
            self._wake.set()

    @property
    def running(self) -> int:
        return len(self._active)

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
                self._thread.start()

    # --- the worker ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        self.threads = use_decode_threads(self.model.device)   # one core fewer on the CPU: the consumers need one
        while True:
            if not self._active and self._waiting.empty():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._drop_cancelled()
                # every waiting request that fits joins before the next step: a burst of N requests would
                # otherwise wait N steps for its last first token (time to first token, bench/serve_load.py)
                joining = []
                while len(self._active) + len(joining) < self.max_batch and not self._waiting.empty():
                    joining.append(self._waiting.get())
                if joining:
                    self._admit_all(joining)
                if self._active:
                    self._step()
            except BaseException as exc:      # a failed step fails every running request, not the server
                for req in self._active:
                    req.out.put(exc)
                self._reset()

    def _reset(self) -> None:
        self._active, self._cache, self._mask = [], None, None

    def _forward(self, model=None, **kwargs) -> torch.Tensor:
        with self.lock, torch.no_grad():
            return (model or self.model)(use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1, :].float()

    def _admit_all(self, reqs: list[_Request]) -> None:
        for req in reqs:
            self._admit(req)

    def _admit(self, req: _Request) -> None:
        if req.cancelled.is_set():
            req.out.put(_END)
            return
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([req.prompt], device=self.model.device)
        logits = self._forward(self.prefill_model, input_ids=ids, cache=cache)
        req.length = len(req.prompt)
        if self._emit(req, self._pick([req], logits)[0]):
            req.out.put(_END)                    # ended on its first token: it never joins
            return
        self._join(req, cache)

    def _join(self, req: _Request, cache: DynamicCache) -> None:
        new_len = req.length
        if self._cache is None:
            self._cache, self._mask = cache, torch.ones(1, new_len, dtype=torch.long, device=self.model.device)
            self._active = [req]
            return
        cur_len = self._mask.shape[1]
        width = max(cur_len, new_len)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        row = torch.ones(1, new_len, dtype=torch.long, device=self._mask.device)
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(row, width, dim=1)], dim=0)
        self._active.append(req)

    def _step(self) -> None:
        reqs = self._active
        self.peak = max(self.peak, len(reqs))
        logits = self._decode(reqs)
        keep, ended = [], []
        for i, (req, tok) in enumerate(zip(reqs, self._pick(reqs, logits))):
            req.length += 1
            (ended if self._emit(req, tok) else keep).append(i)
        if ended:
            self._keep(keep)
            for i in ended:
                reqs[i].out.put(_END)

    def _decode(self, reqs: list[_Request]) -> torch.Tensor:
        """One forward pass of shape (B, 1): each row's last token at its own position; logits [B, V]."""
        last = torch.tensor([[r.generated[-1]] for r in reqs], device=self.model.device)
        positions = torch.tensor([[r.length] for r in reqs], device=self.model.device)
        self._mask = torch.cat([self._mask, torch.ones(len(reqs), 1, dtype=torch.long, device=self._mask.device)], 1)
        if self.row_step is not None:
            with self.lock, torch.no_grad():
                logits = self.row_step.decode(self._cache.layers, last, positions, self._mask)
            if logits is not None:
                return logits
        return self._forward(input_ids=last, attention_mask=self._mask, position_ids=positions, cache=self._cache)

    def warm_up(self) -> bool:
        """Compile the row step now, in a thread with the decode loop's OpenMP threads (inductor writes its
        kernels for the thread count it compiles under); True when there is a compiled step to use."""
        if self.row_step is None:
            return False
        done = []

        def work():
            use_decode_threads(self.model.device)
            with self.lock:
                done.append(self.row_step.warm_up())

        thread = threading.Thread(target=work, name="batcher-warm-up")
        thread.start()
        thread.join()
        return bool(done and done[0])

    def _pick(self, reqs: list[_Request], logits: torch.Tensor) -> list[int]:
        """The next token of each row, each with its own settings and generator (inference/row_sampling.py)."""
        return next_tokens(logits, reqs, _Request.history).tolist()

    def _emit(self, req: _Request, tok: int) -> bool:
        """Hand TOK to the consumer; True when the request has ended. The caller puts `_END` once the row
        is out of the batch: a consumer told it ended may be the last thing a process waits for, and a
        worker still in a torch op when the interpreter exits aborts it ("terminate called ...")."""
        if req.cancelled.is_set():
            return True
        req.generated.append(tok)
        ended = tok in self.stop or len(req.generated) >= req.max_new_tokens
        if tok not in self.stop:
            req.pending.append(tok)
        now = time.perf_counter()
        if req.pending and (ended or len(req.generated) == 1 or now - req.flushed >= FLUSH_S):
            req.out.put(req.pending)
            req.pending, req.flushed = [], now
        return ended

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._active if r.cancelled.is_set()]
        if gone:
            self._keep([i for i, r in enumerate(self._active) if not r.cancelled.is_set()])
            for r in gone:
                r.out.put(_END)

    def _keep(self, rows: list[int]) -> None:
        """Keep only ROWS of the running batch, then cut the columns that are padding in every row."""
        if not rows:
            self._reset()
            return
        self._active = [self._active[i] for i in rows]
        index = torch.tensor(rows, device=self._mask.device)
        mask = self._mask[index]
        first = int(mask.any(0).nonzero()[0])     # the first column some row still uses
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """T padded with zeros on the left of DIM up to WIDTH (keys/values: (B, heads, T, d), dim 2)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
