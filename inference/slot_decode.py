"""Batched decoding into fixed cache slots, for continuous batching on CUDA: one step decodes every slot.

    dec = SlotDecoder(model, slots=8, length=4096)      # Llama-family models (inference/decode_step.py)
    logits = dec.prefill_many(slots, prompts)           # new requests: each prompt into its own slot, one pass
    logits = dec.decode(tokens, positions, window)      # one token for each of the 8 slots: [8, vocab]

Why: the dynamic-cache batcher (inference/batching.py) runs the model's own forward each step, which
on a big GPU is host-bound (~15 ms a step for a 1.8B model whose weights read in ~1 ms) and grows with
the batch (KV stacking when a request joins, per-row padding). Here the cache is preallocated, one slot
(kv_heads x length) per request, and a step always has the same shapes: tokens [S, 1], each slot's own
position [S] -- so the step is torch.compile'd (the layer written out once, as in decode_step.py) and
captured as one CUDA graph, replayed for every token. Joining is a prefill into a free slot (a burst of
requests: one batched prefill); leaving
frees the slot; nothing is copied. Free slots are decoded too (their output is ignored): at S <= 16 a
decode step costs about the same for 1 row as for 16, as it reads the same weights.

Attention reads only the first `window` cache positions (512/1024/2048/4096, the smallest holding every
running request), one graph per window, so short chats do not pay for 4096 positions. Greedy tokens
equal `generate`'s alone (tests/test_batching.py checks it on CPU in fp32, where the same code runs
eagerly without graphs).

On CPU `compile=True` compiles the same step with inductor's C++ backend (g++): its tokens equal the
eager step's (tests/test_batching.py); `batch_decoder="compiled-slots"` in inference/engine.py.
"""
from __future__ import annotations

import torch

from inference import decode_step
from inference.decode_step import attend, core_model, project, tail

WINDOWS = (512, 1024, 2048, 4096)


def slot_layer(layer, h, cos, sin, keys, values, rows, pos, mask):
    """One decoder layer for one new token per slot. h [S, 1, hidden]; cos/sin [S, 1, D]; keys/values
    the layer's cache [S, kv_heads, W, D] (a window of it); rows = arange(S); pos [S] each slot's position;
    mask [S, 1, 1, W] True where a slot may attend."""
    attn = layer.self_attn
    q, k, v = project(attn, layer.input_layernorm(h), cos, sin)                          # [S, heads, 1, D]
    keys[rows, :, pos] = k[:, :, 0]                 # each slot writes at its own position
    values[rows, :, pos] = v[:, :, 0]
    h = h + attn.o_proj(attend(q, keys, values, mask, attn.scaling))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def prefill_layer(layer, h, cos, sin, keys, values, slots):
    """One decoder layer over B new prompts at once, right-padded to T: h [B, T, hidden]; keys/values the
    layer's whole cache [S, kv_heads, L, D], each prompt's keys written at positions 0..T-1 of its slot
    (slots [B]). Causal attention over the new tokens only (a request starts at position 0), so a real
    token never sees the padding after it; the padding's keys land past the prompt, where a slot's stale
    positions always are: masked until the row's own tokens overwrite them."""
    attn = layer.self_attn
    b, t = h.shape[0], h.shape[1]
    q, k, v = project(attn, layer.input_layernorm(h), cos, sin)                          # [B, heads, T, D]
    keys[slots, :, :t] = k
    values[slots, :, :t] = v
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                                         enable_gqa=q.shape[1] != k.shape[1])
    h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def slot_head(embed, tokens, pos, cos_table, sin_table, positions):
    """Embeddings of each slot's token, its cos/sin, and the mask over the window (0..pos per slot)."""
    mask = (positions[None, :] <= pos[:, None])[:, None, None, :]
    return embed(tokens), cos_table[0, pos][:, None], sin_table[0, pos][:, None], mask


class SlotDecoder:
    """S cache slots of `length` positions over a Llama-family model; `decode` steps them all at once.
    compile: torch.compile the step (CUDA default); use_graph: replay it as a CUDA graph (CUDA default);
    tuned: compile with coordinate-descent tuning (decode_step.compile_options)."""

    def __init__(self, model, slots: int, length: int, compile: bool | None = None, use_graph: bool | None = None,
                 backend: str = "inductor", tuned: bool = False):
        reason = decode_step.unsupported(model, length)
        if reason:
            raise ValueError(f"slot decoding: {reason}")
        core = core_model(model)
        inner = core.model
        self.embed, self.norm, self.lm_head = inner.embed_tokens, inner.norm, core.lm_head
        self.layers = list(inner.layers)
        self.slots, self.length = slots, length
        weight = inner.embed_tokens.weight
        self.device = weight.device
        cuda = self.device.type == "cuda"
        self.use_graph = cuda if use_graph is None else use_graph
        shape = (slots, core.config.num_key_value_heads, length, self.layers[0].self_attn.head_dim)
        with torch.no_grad():
            self.cache = [(torch.zeros(shape, dtype=weight.dtype, device=self.device),
                           torch.zeros(shape, dtype=weight.dtype, device=self.device)) for _ in self.layers]
            self.positions = torch.arange(length, device=self.device)
            probe = torch.zeros(1, 1, 1, dtype=weight.dtype, device=self.device)
            self.cos, self.sin = inner.rotary_emb(probe, self.positions[None])   # the model's own rotary values
        self.rows = torch.arange(slots, device=self.device)
        self.windows = sorted({w for w in WINDOWS if w < length} | {length})
        self._layer, self._head, self._tail = slot_layer, slot_head, tail
        if cuda if compile is None else compile:
            decode_step.use_disk_cache()
            opts = decode_step.compile_options(backend, tuned)
            self._layer = torch.compile(slot_layer, **opts)
            self._head = torch.compile(slot_head, **opts)
            self._tail = torch.compile(tail, **opts)
        # the step's inputs and outputs live in fixed buffers, so a captured graph can be replayed
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_error: str | None = None         # why steps run without a graph, if they do
        self.fallback: str | None = None            # why the step runs uncompiled, if it does
        self._compiled: set[int] = set()           # windows whose step has run (and compiled) once

    def window(self, needed: int) -> int:
        """The smallest window holding `needed` positions (the longest running request's)."""
        return next((w for w in self.windows if w >= needed), self.length)

    @torch.no_grad()
    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Several prompts into their slots in one pass (right-padded to the longest): a burst of requests
        costs one eager prefill instead of one each -- on a GPU a prefill of a short prompt is host time,
        ~the same for 1 row as for 16. Returns each prompt's last-position logits [B, V]."""
        t = max(map(len, prompts))
        if t > self.length:
            raise ValueError(f"prompt of {t} tokens does not fit a cache slot of {self.length}")
        ids = torch.zeros(len(prompts), t, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        at = torch.tensor(slots, device=self.device)
        h = self.embed(ids.to(self.device))
        cos, sin = self.cos[:, :t], self.sin[:, :t]
        for layer, (k, v) in zip(self.layers, self.cache):
            h = prefill_layer(layer, h, cos, sin, k, v, at)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        h = h[torch.arange(len(prompts), device=self.device), last][:, None]       # [B, 1, hidden]
        return tail(self.norm, self.lm_head, h)[0]

    def _step(self, window: int) -> None:
        h, cos, sin, mask = self._head(self.embed, self.tokens, self.pos, self.cos, self.sin,
                                       self.positions[:window])
        for layer, (k, v) in zip(self.layers, self.cache):
            h = self._layer(layer, h, cos, sin, k[:, :, :window], v[:, :, :window], self.rows, self.pos, mask)
        logits, _ = self._tail(self.norm, self.lm_head, h)
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)

    @torch.no_grad()
    def decode(self, tokens: list[int], positions: list[int], window: int) -> torch.Tensor:
        """One step for every slot: slot i takes tokens[i] at positions[i] (< window). Returns the logits
        [S, V] (a buffer the next step overwrites)."""
        self.tokens.copy_(torch.tensor(tokens, dtype=torch.long).view(-1, 1), non_blocking=True)
        self.pos.copy_(torch.tensor(positions, dtype=torch.long), non_blocking=True)
        return self.replay(window)

    @torch.no_grad()
    def replay(self, window: int) -> torch.Tensor:
        """One step on whatever `tokens` [S, 1] and `pos` [S] hold now -- the batcher's pipelined steps
        write them on the device, so nothing waits for the host. Returns the logits buffer [S, V]."""
        graph = self.graphs.get(window) if self.use_graph else None
        if graph is None and self.use_graph:
            graph = self._capture(window)
        if graph is None:
            self._run(window)
        else:
            graph.replay()
        return self.logits

    def _run(self, window: int) -> None:
        """One step without a graph. A window's first step compiles its shapes; a compile error there
        falls back to the uncompiled step for good (`fallback` says why)."""
        if self._layer is slot_layer or window in self._compiled:
            self._step(window)
            return
        try:
            self._step(window)
        except Exception as exc:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.fallback = f"{type(exc).__name__}: {exc}"
            self._layer, self._head, self._tail = slot_layer, slot_head, tail
            self._step(window)
        self._compiled.add(window)

    def _capture(self, window: int):
        """Compile (first use of this window) and capture the step; None when the driver refuses a
        capture (steps then run without a graph; `graph_error` says why). The warm-up steps compute
        what the real step will: they write the same keys/values at the slots' current positions."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run(window)                       # compiles this window's shapes (or falls back)
            self._step(window)                      # warm kernels and the allocator
        torch.cuda.current_stream().wait_stream(stream)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(window)
        except Exception as exc:
            torch.cuda.synchronize()
            self.graph_error = f"{type(exc).__name__}: {exc}"
            self.use_graph = False
            return None
        self.graphs[window] = graph
        return graph
