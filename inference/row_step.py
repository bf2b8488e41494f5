"""The dynamic batcher's decode step written out for Llama-family models and compiled, for the CPU.

    step = RowStep(model, length=2048)                       # the engine makes one (inference/engine.py)
    logits = step.decode(cache.layers, last, positions, mask)    # [B, V]; None: not compiled, run the model
    step.warm_up()                                           # compile now (app start), not on a visitor's turn

Why: on 2 CPU cores the int4 decode copy (inference/cpu_decode.py) spends about as long in Python and in
transformers' per-layer bookkeeping (mask building, rotary, cache update, ~900 small ops a token) as in its
4-bit kernels. Compiled, those ops become a few C++ loops: through the apps' path the demo's fine-tuned
135M model decodes 44 against 37 tokens/s for one stream and 102 against 87 for four, 2 EPYC cores, with the
same held-out scores (`bench/batch_decode.py --impl serve serve-dynamic`, docs/BENCHMARKS.md "Session 16").

How: the batcher's state stays what it is (a DynamicCache left-padded per row, a [B, T] mask, each row's
position), so requests join and leave as before and prompts are still read by the model's own forward.
Only the step is replaced: each layer's keys/values get the new token's appended (as DynamicCache.update
does) and the new token attends to the positions its row's mask allows, through the layer's own
submodules (norms, projections, MLP: the int4 layers run their own kernel). One function serves every
layer, compiled with dynamic shapes: one graph for every layer, batch size and cache length -- two
in practice, since dynamo treats a size of 1 as a constant (one row; two or more rows). Compiling them
takes ~25 s on one core with an empty inductor cache and ~4 s from the cache on disk
(decode_step.use_disk_cache). If compiling fails (no C++ compiler, an unsupported op), the step says
why once in the log and the batcher runs the model's forward from then on; the cache is only written
once every layer has run, so a failed step leaves it as it was.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from inference.decode_step import attend, compile_failure, core_model, project, unsupported, use_disk_cache

log = logging.getLogger(__name__)
WARM = 17       # the cache length warm_up compiles with


def row_layer(layer, h, cos, sin, keys, values, allowed):
    """One decoder layer for one new token per row: h [B, 1, hidden]; cos/sin [B, 1, D]; keys/values the
    layer's cache [B, kv_heads, T, D]; allowed [B, 1, 1, T + 1] bool. Returns (h, keys, values), the cache
    with this token's keys/values appended."""
    attn = layer.self_attn
    q, k, v = project(attn, layer.input_layernorm(h), cos, sin)                        # [B, heads, 1, D]
    keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
    h = h + attn.o_proj(attend(q, keys, values, allowed, attn.scaling))
    return h + layer.mlp(layer.post_attention_layernorm(h)), keys, values


def row_tail(norm, lm_head, h):
    """fp32 logits [B, V] of each row's new token."""
    return lm_head(norm(h))[:, -1].float()


class RowStep:
    """One (B, 1) decode step over the batcher's cache, compiled (`backend`: torch.compile's)."""

    def __init__(self, model, length: int, backend: str = "inductor"):
        reason = unsupported(model, length)
        if reason:
            raise ValueError(f"compiled row step: {reason}")
        core = core_model(model)
        inner = core.model
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self.lm_head = core.lm_head
        self.layers = list(inner.layers)
        self.kv_heads, self.head_dim = core.config.num_key_value_heads, self.layers[0].self_attn.head_dim
        self.failed: str | None = None       # why compiling failed; the batcher then runs the model's forward
        self.steps = 0                       # steps made here (tests, benchmarks)
        if backend == "inductor":
            use_disk_cache()
        self._layer = torch.compile(row_layer, dynamic=True, backend=backend)
        self._tail = torch.compile(row_tail, dynamic=True, backend=backend)

    def decode(self, layers, last: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """LAYERS: the cache's layers (`.keys` / `.values` [B, kv_heads, T, D]); last, positions [B, 1]; mask
        [B, T + 1] (1 = a real token, the new one included). Appends each row's keys/values to LAYERS and
        returns the logits [B, V]; None (LAYERS untouched) once compiling has failed."""
        if self.failed is not None:
            return None
        try:
            h = self.embed(last)
            cos, sin = self.rotary(h, positions)
            allowed = mask.bool()[:, None, None, :]
            grown = []
            for layer, cached in zip(self.layers, layers):
                # contiguous: the graph compiled for the layout our own cat leaves; a prompt's cache comes as
                # transposed views and a row leaving cuts columns -- each would compile another graph (3-4 s)
                keys, values = cached.keys.contiguous(), cached.values.contiguous()
                h, keys, values = self._layer(layer, h, cos, sin, keys, values, allowed)
                grown.append((keys, values))
            logits = self._tail(self.norm, self.lm_head, h)
        except Exception as exc:  # noqa: BLE001 -- any compile failure: decode as before, say why once
            self.failed = compile_failure(exc)
            log.warning("compiled decode step unavailable, the batcher runs the model's forward: %s", self.failed)
            return None
        for cached, (keys, values) in zip(layers, grown):
            cached.keys, cached.values = keys, values
        self.steps += 1
        return logits

    def warm_up(self, rows: tuple[int, ...] = (1, 2)) -> bool:
        """Compile the step for one row and for several (the two graphs) on a dummy cache; True when compiled."""
        weight = self.embed.weight
        with torch.no_grad():
            for b in rows:
                # WARM cached positions: a size no model dimension has -- dynamo gives equal sizes one symbol, and a
                # cache as long as the kv heads would fix its length to that in the graph (a recompile per length)
                shape = (b, self.kv_heads, WARM, self.head_dim)
                layers = [SimpleNamespace(keys=weight.new_zeros(shape), values=weight.new_zeros(shape))
                          for _ in self.layers]
                last = torch.zeros(b, 1, dtype=torch.long, device=weight.device)
                positions = torch.full((b, 1), WARM, device=weight.device)
                mask = torch.ones(b, WARM + 1, dtype=torch.long, device=weight.device)
                if self.decode(layers, last, positions, mask) is None:
                    return False
        self.steps = 0
        return True
