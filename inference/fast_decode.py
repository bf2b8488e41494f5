"""Fast batch-1 decoding for the chat engine: a static KV cache sized to the conversation, and on
CUDA the one-token step captured once as a CUDA graph and replayed for every token.

    engine = loaded.engine(fast_decode=True)        # CUDA: mode "compile" (falls back to "graph")
    engine = loaded.engine(fast_decode="graph")     # CPU: plain `generate`, unchanged, in every mode

Why: `generate` with the default dynamic cache is host-bound on a big GPU (about 27 ms a token for a
1.8B model on an H200, where reading the weights takes about 1 ms): Python and thousands of kernel
launches per token. A replayed graph launches the whole step at once. Three ways to build the step:
- "graph": the model's own forward (any architecture, any PEFT adapter) on a `transformers.StaticCache`
  with an explicit mask over the cache slots. Capture takes about a second and compiles nothing, but
  the graph replays ~40 small eager kernels per layer.
- "compile": Llama-family models only (inference/decode_step.py): the layer written out once and
  torch.compile'd (one graph shared by all layers; inductor's cache on disk), so the norms, rotary,
  cache writes and softmax fuse into a few kernels. The first call compiles (8.95 s for a 1.8B model on
  an H200, docs/BENCHMARKS.md), 4.5 s once inductor's disk cache is warm. Anything it cannot handle falls back
  to "graph", and says why.
- "tuned": "compile" with inductor's coordinate-descent tuning of every generated kernel (gpt-fast's setting):
  1.23-1.26x the tokens/s (541-564 against 439-445 for the 1.8B shape, two calls on H100s), but the first call
  takes 18-24 s with a cold cache and 9-10 s with a warm one (against 8-9 and 4-5: docs/BENCHMARKS.md "Session
  15"). For a server that warms up before its first visitor (app.py does); opt-in (FAST_DECODE=tuned).
Both pick the next token on the device inside the graph (argmax; sampling runs on the device too)
and feed it to the next step there, so the host reads one token id per token and, when greedy, the
GPU already computes the next token while the host streams the current one.

Cache length comes in buckets (512/1024/2048/4096, never above `max_len`): the smallest that holds
prompt + max_new_tokens, each with its own cache and graph, so short chats do not attend over 4096
slots. Greedy output is `generate`'s token for token (tests/test_speed.py checks it on CPU in fp32).
`bench/decode_speed.py` measures the modes against `generate`.
"""
from __future__ import annotations

import time
from contextlib import nullcontext as _nothing
from typing import Callable, Iterator

import torch
from transformers import StaticCache

from inference import decode_step
from inference.row_sampling import Setting, penalty, probabilities

BUCKETS = (512, 1024, 2048, 4096)
MODES = ("graph", "compile", "tuned")
COMPILED = ("compile", "tuned")


def sample_on_device(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0,
                     repetition_penalty: float = 1.0, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token id as a 1-element device tensor, as `generate` picks it: a repetition penalty on the
    tokens marked in `seen` (a [V] bool mask of the prompt and the reply so far), then argmax when
    temperature is 0, else temperature, top-k, top-p (inference/row_sampling.py, the batchers' own) and a
    draw from the global generator. No host sync."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        logits = torch.where(seen, penalty(logits, repetition_penalty), logits)
    if not temperature or temperature <= 0:
        return logits.argmax(-1).view(1)
    probs = probabilities(logits[None], [Setting(temperature, top_k, top_p)])[0]
    return torch.multinomial(probs, 1).view(1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> int:
    return int(sample_on_device(logits, temperature, top_p, top_k))


def cache_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


class ModelStep:
    """Mode "graph": the model's own forward on a transformers StaticCache of `length` slots."""

    def __init__(self, model, length: int):
        self.model, self.length = model, length
        self.cache = StaticCache(config=cache_config(model), max_cache_len=length)
        self.slots = torch.arange(length, device=next(model.parameters()).device)

    def _forward(self, input_ids, position_ids, mask):
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def reset(self):
        self.cache.reset()        # the cache's own write counter back to slot 0

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        positions = self.slots[:input_ids.shape[1]][None]
        mask = (self.slots[None, :] <= positions[0, :, None])[None, None]   # causal over the slots
        return self._forward(input_ids, positions, mask)

    def decode(self, token: torch.Tensor, pos: torch.Tensor):
        mask = (self.slots <= pos.view(1))[None, None, None, :]            # attend to slots 0..pos
        logits = self._forward(token, pos, mask)
        return logits, logits.argmax(-1, keepdim=True)


class Bucket:
    """One cache length: its step (cache included) and, on CUDA, its captured graph."""

    def __init__(self, step):
        self.step, self.length = step, step.length
        self.graph: torch.cuda.CUDAGraph | None = None


class StaticDecoder:
    """Decode one conversation at a time into a preallocated cache of at most `max_len` tokens.

    mode: "graph", "compile" or "tuned" (see the module docstring); backend: torch.compile's ("inductor";
    tests use others). use_graph: capture CUDA graphs (default: on CUDA)."""

    def __init__(self, model, max_len: int = 2048, use_graph: bool | None = None, mode: str = "graph",
                 backend: str = "inductor", buckets: tuple[int, ...] = BUCKETS):
        if mode not in MODES:
            raise ValueError(f"fast decode mode {mode!r}: expected one of {', '.join(MODES)}")
        self.model, self.max_len, self.backend = model, max_len, backend
        self.device = next(model.parameters()).device
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.fallback = decode_step.unsupported(model, max_len) if mode in COMPILED else None
        self.mode = "graph" if self.fallback else mode
        self.lengths = sorted({b for b in buckets if b < max_len} | {max_len})
        self.buckets: dict[int, Bucket] = {}
        self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)   # the step's input...
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)     # ...and its slot
        self.logits: torch.Tensor | None = None                                  # the step's output
        pin = self.device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.long, pin_memory=pin)             # token ids, read back
        self.events = [torch.cuda.Event() for _ in range(2)] if pin else [None, None]
        self.slot = 0
        self.graph_error: str | None = None
        self.warmup_s = 0.0                                                      # all buckets so far
        self.stats: dict = {}

    def fits(self, total_tokens: int) -> bool:
        return total_tokens <= self.max_len

    def bucket_length(self, total_tokens: int) -> int:
        return next((n for n in self.lengths if n >= total_tokens), self.max_len)

    # -- building a bucket ---------------------------------------------------------------------

    def _new_step(self, length: int):
        if self.mode in COMPILED:
            try:
                return decode_step.LayerStep(self.model, length, compile=True, backend=self.backend,
                                             tuned=self.mode == "tuned")
            except Exception as exc:   # e.g. an unexpected layer: the model's own forward still works
                self._fall_back(exc)
        return ModelStep(self.model, length)

    def _fall_back(self, exc: BaseException):
        self.fallback = f"{type(exc).__name__}: {exc}"
        self.mode = "graph"                               # for this bucket and those built later

    def _advance(self, step):
        """One token: logits, next token and slot of the step, all on the device (what a replay does)."""
        logits, nxt = step.decode(self.token, self.pos)
        self.logits.copy_(logits)
        self.token.copy_(nxt)
        self.pos.add_(1)

    @torch.inference_mode()
    def _warm(self, bucket: Bucket):
        """Allocate the cache, compile (mode "compile") and capture the step graph (CUDA). An error
        before the capture is the step's own (the caller falls back from "compile"); a capture the
        driver refuses leaves the step running eagerly."""
        step = bucket.step
        logits = step.prefill(self.token)                  # a 1-token prompt allocates what a step needs
        if self.logits is None:                            # one output buffer for every bucket's graph
            self.logits = torch.empty_like(logits)
        self.pos.fill_(1)
        stream = torch.cuda.Stream() if self.use_graph else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else _nothing():
            for _ in range(2 if self.use_graph else 1):   # compile, warm kernels and the allocator
                self._advance(step)
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._advance(step)
                bucket.graph = graph
            except Exception as exc:
                torch.cuda.synchronize()
                self.graph_error = f"{type(exc).__name__}: {exc}"
                if isinstance(step, ModelStep):            # its cache counter may be half-way: a fresh one
                    bucket.step = step = ModelStep(self.model, bucket.length)
        step.reset()

    def bucket(self, total_tokens: int) -> Bucket:
        """The bucket for a conversation of `total_tokens`, built and warmed on first use."""
        length = self.bucket_length(total_tokens)
        if length not in self.buckets:
            t0 = time.perf_counter()
            bucket = Bucket(self._new_step(length))
            try:
                self._warm(bucket)
            except Exception as exc:
                if self.mode not in COMPILED:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self._fall_back(exc)                         # compile failed: the model's own forward
                bucket = Bucket(ModelStep(self.model, length))
                self._warm(bucket)
            self.buckets[length] = bucket
            self.warmup_s += time.perf_counter() - t0
        return self.buckets[length]

    def warm_up(self, total_tokens: int | None = None):
        """Build the bucket a conversation of `total_tokens` (default: the largest) would use."""
        self.bucket(total_tokens or self.max_len)

    # -- decoding ------------------------------------------------------------------------------

    def _fetch(self) -> Callable[[], int]:
        """Start copying the current token id to the host; the returned call waits for it."""
        self.slot = i = 1 - self.slot
        self.host[i:i + 1].copy_(self.token.view(1), non_blocking=True)
        event = self.events[i]
        if event is not None:
            event.record()

        def read() -> int:
            if event is not None:
                event.synchronize()
            return int(self.host[i])
        return read

    @torch.inference_mode()
    def _start(self, bucket: Bucket, input_ids, pick) -> Callable[[], int]:
        logits = bucket.step.prefill(input_ids.to(self.device))
        self.token.copy_(pick(logits[0]).view(1, 1))
        self.pos.fill_(input_ids.shape[1])
        return self._fetch()

    @torch.inference_mode()
    def _next(self, bucket: Bucket, pick=None) -> Callable[[], int]:
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._advance(bucket.step)
        if pick is not None:      # the step chose argmax: penalise / sample instead, on the device
            self.token.copy_(pick(self.logits[0]).view(1, 1))
        return self._fetch()

    def tokens(self, input_ids: torch.Tensor, max_new_tokens: int, stop_ids, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0) -> Iterator[int]:
        """Yield generated token ids (stop token excluded) for one prompt of shape [1, n]; sampling as
        `generate` does it (`sample_on_device`), all on the device."""
        n = input_ids.shape[1]
        bucket = self.bucket(n + max_new_tokens)
        plain = (not temperature or temperature <= 0) and repetition_penalty == 1.0   # the step's own argmax
        seen = None
        if repetition_penalty != 1.0:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            seen[input_ids.view(-1).to(self.device)] = True

        def pick(logits):
            tok = sample_on_device(logits, temperature, top_p, top_k, repetition_penalty, seen)
            if seen is not None:
                seen[tok] = True
            return tok
        stop = set(stop_ids)
        t0 = time.perf_counter()
        first = None
        produced = 0
        pending = self._start(bucket, input_ids, pick)
        for i in range(max_new_tokens):
            more = i + 1 < max_new_tokens and n + i < bucket.length      # room to decode token i
            ahead = self._next(bucket) if more and plain else None       # overlap with the host
            next_id = pending()
            if first is None:
                first = time.perf_counter() - t0
            if next_id in stop:
                break
            produced += 1
            yield next_id
            if not more:
                break
            pending = ahead or self._next(bucket, None if plain else pick)
        self.stats = {"prompt_tokens": n, "new_tokens": produced, "ttft_s": first or 0.0,
                      "elapsed_s": time.perf_counter() - t0, "cache_len": bucket.length,
                      "mode": bucket.step.mode if isinstance(bucket.step, decode_step.LayerStep) else "graph",
                      "graph": bucket.graph is not None, "graph_error": self.graph_error,
                      "fallback": self.fallback, "warmup_s": self.warmup_s}


def stream_text(tokenizer, token_ids: Iterator[int | list[int]]) -> Iterator[str]:
    """The growing reply text, as `TextIteratorStreamer(skip_special_tokens=True)` would show it. Items are
    token ids, or lists of them (inference/batching.py hands over all tokens decoded since the last ask).

    Incremental: each token decodes only a short window (from the start of the previous piece), not the
    whole reply, so a token costs the same at the end of a long reply as at its start -- with many
    streams served at once the decoding was a per-step cost that grew with every reply's length. The
    window starts one piece back because a piece's text can depend on the token before it (a leading
    space, a byte of a multi-byte character)."""
    ids: list[int] = []
    text = ""
    start = done = 0              # window start; ids[:done] are already in `text`
    for item in token_ids:
        if isinstance(item, list):
            ids.extend(item)
        else:
            ids.append(item)
        before = tokenizer.decode(ids[start:done], skip_special_tokens=True)
        after = tokenizer.decode(ids[start:], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) <= len(before):   # half a character, or nothing shown yet
            continue
        text += after[len(before):]
        start, done = done, len(ids)
        yield text
