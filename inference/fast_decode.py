"""Fast batch-1 decoding for the chat engine: a static KV cache, and on CUDA the one-token step
captured once as a CUDA graph and replayed for every token.

    engine = loaded.engine(fast_decode=True)     # CUDA: this path; CPU: plain `generate`, unchanged

Why: `generate` with the default dynamic cache is host-bound on a big GPU (about 27 ms a token for a
1.8B model on an H200, where reading the weights takes about 1 ms): Python and thousands of kernel
launches per token. A replayed graph launches the whole step at once. Capturing takes about a second
and compiles nothing, so the first reply is quick too (torch.compile would take a minute).

The step is the model's own forward (any PEFT adapter included) on a `transformers.StaticCache`
with an explicit attention mask over the cache slots, so the math is `generate`'s: greedy output is
token-for-token the same (tests/test_speed.py checks it on CPU without the graph).
`bench/decode_speed.py` measures it against `generate`.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from transformers import StaticCache


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> int:
    """Greedy when temperature is 0, else temperature + nucleus (top-p) sampling, as `generate` does."""
    if not temperature or temperature <= 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p          # keep the smallest set reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1))


class StaticDecoder:
    """Decode one conversation at a time into a preallocated cache of `max_len` tokens."""

    def __init__(self, model, max_len: int = 2048, use_graph: bool | None = None):
        self.model = model
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.cache = StaticCache(config=self.cache_config(), max_cache_len=max_len)
        self.slots = torch.arange(max_len, device=self.device)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)   # the step's input
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)     # its position
        self.logits = None
        self.graph = None
        self.graph_error: str | None = None
        self.warmup_s = 0.0
        self.stats: dict = {}

    def fits(self, total_tokens: int) -> bool:
        return total_tokens <= self.max_len

    def _forward(self, input_ids, position_ids, mask):
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _step(self):
        """One token at `self.pos`: everything a replay does, on static buffers only."""
        mask = (self.slots <= self.pos.view(1))[None, None, None, :]    # attend to slots 0..pos
        logits = self._forward(self.token, self.pos, mask)
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        n = input_ids.shape[1]
        positions = self.slots[:n][None]
        mask = (self.slots[None, :] <= positions[0, :, None])[None, None]   # causal over the slots
        return self._forward(input_ids, positions, mask)

    def warm_up(self):
        """Allocate the cache, and on CUDA capture the step graph (about a second, once)."""
        if self.graph is not None or not self.use_graph or self.graph_error:
            return
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                self._prefill(self.token)
                self.pos.fill_(1)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):                  # warm kernels and allocator outside the capture
                        self._step()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step()
                self.graph = graph
                self.cache.reset()
        except Exception as exc:   # an op the capture refuses: keep the static cache, run eagerly
            self.graph_error = f"{type(exc).__name__}: {exc}"
            self.graph = None
            self.cache = StaticCache(config=self.cache_config(), max_cache_len=self.max_len)
        self.warmup_s = time.perf_counter() - t0

    def cache_config(self):
        config = self.model.config
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def tokens(self, input_ids: torch.Tensor, max_new_tokens: int, stop_ids, temperature: float = 0.0,
               top_p: float = 1.0) -> Iterator[int]:
        """Yield generated token ids (stop token excluded) for one prompt of shape [1, n]."""
        self.warm_up()
        stop = set(stop_ids)
        t0 = time.perf_counter()
        n = input_ids.shape[1]
        produced = 0
        with torch.inference_mode():
            logits = self._prefill(input_ids.to(self.device))
            first = None
            for i in range(max_new_tokens):
                next_id = sample_next(logits[0], temperature, top_p)
                if first is None:
                    first = time.perf_counter() - t0
                if next_id in stop:
                    break
                produced += 1
                yield next_id
                if n + i + 1 >= self.max_len or i + 1 == max_new_tokens:
                    break
                self.token.fill_(next_id)
                self.pos.fill_(n + i)
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._step()
                logits = self.logits
        elapsed = time.perf_counter() - t0
        self.stats = {"prompt_tokens": n, "new_tokens": produced, "ttft_s": first or 0.0, "elapsed_s": elapsed,
                      "graph": self.graph is not None, "graph_error": self.graph_error}


def stream_text(tokenizer, token_ids: Iterator[int]) -> Iterator[str]:
    """The growing reply text, as `TextIteratorStreamer(skip_special_tokens=True)` would show it."""
    ids: list[int] = []
    text = ""
    for tid in token_ids:
        ids.append(tid)
        new = tokenizer.decode(ids, skip_special_tokens=True)
        if new.endswith("\ufffd"):          # half of a multi-byte character: wait for the rest
            continue
        if new != text:
            text = new
            yield text
