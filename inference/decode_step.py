"""The one-token decode step written out for Llama-family models, so torch.compile can fuse it.

    step = LayerStep(model, length=1024, compile=True)   # used by inference/fast_decode.py (mode="compile")
    logits = step.prefill(input_ids)                     # eager, fills cache slots 0..n-1
    logits = step.decode(token, pos)                     # compiled; CUDA-graph capturable

Why not the model's own forward: replayed as a CUDA graph it still launches ~40 small eager kernels
per layer per token (RMSNorm as six ops, rotate_half, cache writes, a masked attention).
Compiling it whole would take one layer's compile time 24 times. So this module calls the layer's
own submodules (norms, projections, MLP -- a PEFT adapter on any of them still runs) from one
function, compiled once with static shapes: every decoder layer has the same code and shapes, and
the key/value cache of the layer is an argument rather than looked up by `layer_idx`, so all layers
share one compiled graph. The embedding/rotary/mask head and the norm/lm_head/argmax tail are two
more small compiled functions. Inductor's own CUDA graphs stay off: the caller captures its own
graph around the whole step. Compiled code is kept on disk (TORCHINDUCTOR_CACHE_DIR, default
~/.cache/own-assistant/inductor) so a second process skips inductor's code generation.

The math is the model's: RMSNorm and MLP are the modules themselves, rotary uses the model's own
cos/sin (its rotary module evaluated once per cache slot), attention is softmax(q k^T * scale) v in
fp32 softmax over the filled slots. tests/test_speed.py checks greedy tokens equal `generate`'s.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")     # same decoder layer; qwen3 adds q/k norms


def use_disk_cache() -> str:
    """Point inductor's (and Triton's) cache at a per-user directory unless the caller chose one."""
    path = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                                 str(Path.home() / ".cache" / "own-assistant" / "inductor"))
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def compile_failure(exc: BaseException) -> str:
    """One line on why torch.compile failed, for a log: the exception's type, then dynamo's wrapper line and the
    cause under it ("backend='inductor' raised: CppCompileError: ...") -- the rest is a traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join([f"{type(exc).__name__}:", *lines[:2]])


def core_model(model):
    """The transformers *ForCausalLM under an optional PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model, length: int) -> str | None:
    """Why this step cannot stand in for `model`'s forward (None: it can)."""
    core = core_model(model)
    cfg = core.config
    if cfg.model_type not in FAMILIES:
        return f"model type {cfg.model_type!r} (supported: {', '.join(FAMILIES)})"
    inner = getattr(core, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(core, "lm_head"):
        return "unexpected module layout"
    layer = inner.layers[0]
    attn = getattr(layer, "self_attn", None)
    if not all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp")) \
            or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        return "unexpected decoder layer layout"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window layers"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < length:
        return f"sliding window {window} < cache length {length}"
    return None


def rotate(x, cos, sin):
    """Rotary embedding as transformers applies it (rotate_half), cos/sin: [1, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def project(attn, x, cos, sin):
    """The attention inputs of x [B, T, hidden]: q and k rotated, [B, heads, T, D] and [B, kv_heads, T, D],
    and v [B, kv_heads, T, D] -- shared by every decode and prefill written out here and in slot_decode.py."""
    b, t, d = x.shape[0], x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(b, t, -1, d)
    k = attn.k_proj(x).view(b, t, -1, d)
    v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
    if hasattr(attn, "q_norm"):                     # qwen3: per-head RMSNorm before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    return rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin), v


def layer_forward(layer, h, cos, sin, keys, values, slots, mask):
    """One decoder layer on h [1, T, hidden]: writes its keys/values at `slots` [T] of the layer's cache
    ([1, kv_heads, L, D]) and attends to the cache slots where `mask` [1, 1, T, L] is True.
    `mask=None` means a prefill from slot 0: causal attention over the T new tokens only."""
    attn = layer.self_attn
    t = h.shape[1]
    q, k, v = project(attn, layer.input_layernorm(h), cos, sin)
    keys.index_copy_(2, slots, k)
    values.index_copy_(2, slots, v)
    if mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                           enable_gqa=q.shape[1] != k.shape[1])
        o = o.transpose(1, 2).reshape(1, t, -1)
    else:
        o = attend(q, keys, values, mask, attn.scaling)
    h = h + attn.o_proj(o)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def attend(q, keys, values, mask, scaling):
    """softmax(q k^T x scaling) v over the cache positions where MASK is True, softmax in fp32.
    q [B, heads, T, D]; keys/values [B, kv_heads, L, D]; mask [B, 1, T, L] bool. Returns [B, T, heads x D].
    Grouped-query attention without repeating the cache: the `heads // kv_heads` query heads that share a
    kv head become rows of one matmul against it (transformers' repeat_kv order: head i uses kv head i // g).
    Shared by every step written out here, in slot_decode.py and in row_step.py."""
    b, heads, t, d = q.shape
    kv_heads = keys.shape[1]
    g = heads // kv_heads
    scores = torch.matmul(q.reshape(b, kv_heads, g * t, d), keys.transpose(2, 3)) * scaling     # [B, kv, g*t, L]
    scores = scores.view(b, kv_heads, g, t, -1).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(probs.view(b, kv_heads, g * t, -1), values).view(b, heads, t, d)
    return o.transpose(1, 2).reshape(b, t, heads * d)


def head(embed, token, pos, cos_table, sin_table, slots):
    """Embedding of the current token, its cos/sin, and the mask over cache slots 0..pos."""
    at = pos.view(1)
    mask = (slots <= at)[None, None, None, :]
    return embed(token), cos_table.index_select(1, at), sin_table.index_select(1, at), mask


def tail(norm, lm_head, h):
    """Logits [1, V] of the last position and their argmax [1, 1] (greedy's next token)."""
    logits = lm_head(norm(h[:, -1:]))[:, -1]
    return logits, logits.argmax(-1, keepdim=True)


def compile_options(backend: str, tuned: bool) -> dict:
    """torch.compile's arguments for a decode step: fixed shapes; TUNED adds inductor's coordinate-descent tuning
    of each generated kernel's block sizes (gpt-fast's setting: faster steps, a longer first compile --
    inference/fast_decode.py "tuned")."""
    opts = dict(dynamic=False, backend=backend)
    if tuned and backend == "inductor":
        opts["options"] = {"coordinate_descent_tuning": True}
    return opts


class LayerStep:
    """Cache + rotary tables for `length` slots, and the prefill/decode functions over them."""

    def __init__(self, model, length: int, compile: bool = True, backend: str = "inductor", tuned: bool = False):
        core = core_model(model)
        reason = unsupported(model, length)
        if reason:
            raise ValueError(f"compiled decode step: {reason}")
        inner = core.model
        self.embed, self.norm, self.lm_head = inner.embed_tokens, inner.norm, core.lm_head
        self.layers = list(inner.layers)
        self.length = length
        opts = compile_options(backend, tuned)
        self.mode = "tuned" if compile and "options" in opts else "compile"
        dtype, device = inner.embed_tokens.weight.dtype, inner.embed_tokens.weight.device
        shape = (1, core.config.num_key_value_heads, length, self.layers[0].self_attn.head_dim)
        with torch.no_grad():
            self.cache = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in self.layers]
            self.slots = torch.arange(length, device=device)
            probe = torch.zeros(1, 1, 1, dtype=dtype, device=device)
            # the model's own rotary values for every slot (dynamic-NTK scaling included: positions
            # stay below max_position_embeddings, where transformers keeps the original frequencies)
            self.cos, self.sin = inner.rotary_emb(probe, self.slots[None])
        if compile:
            use_disk_cache()
            self._layer = torch.compile(layer_forward, **opts)
            self._head = torch.compile(head, **opts)
            self._tail = torch.compile(tail, **opts)
        else:
            self._layer, self._head, self._tail = layer_forward, head, tail

    def reset(self):
        pass                       # prefill overwrites slots 0..n-1 and the mask hides the rest

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        h = self.embed(input_ids)
        cos, sin, slots = self.cos[:, :n], self.sin[:, :n], self.slots[:n]
        for layer, (k, v) in zip(self.layers, self.cache):
            h = layer_forward(layer, h, cos, sin, k, v, slots, None)
        return tail(self.norm, self.lm_head, h)[0]

    def decode(self, token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token, pos: [1, 1] device tensors. Returns (logits [1, V], argmax [1, 1]); no host sync."""
        h, cos, sin, mask = self._head(self.embed, token, pos, self.cos, self.sin, self.slots)
        at = pos.view(1)
        for layer, (k, v) in zip(self.layers, self.cache):
            h = self._layer(layer, h, cos, sin, k, v, at, mask)
        return self._tail(self.norm, self.lm_head, h)
