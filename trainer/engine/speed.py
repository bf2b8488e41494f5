"""Speed features of the training engine, each switched by a config field (all off = the plain HF path).

    python -m trainer train internlm2_chat_1_8b_qlora --set fused_loss=true --set compile=true

- `fused_loss`: the causal-LM loss is computed from the last hidden states in row chunks, over the
  labelled (assistant) positions only, so the full [tokens x vocab] logits never exist. At 16k tokens
  and InternLM2's 92,544-word vocabulary those are 3 GiB in bf16 plus 6 GiB in fp32 plus their
  gradient; here one chunk of ~1 GiB at a time. Same math as transformers' `ForCausalLMLoss`
  (bf16 logits, fp32 log-softmax, sum / number of labelled tokens): `tests/test_speed.py` checks loss
  and gradients against it. `retain_kl`'s KL term (trainer/engine/retain.py) is computed in the same
  chunks from the same logits; with `compile` each chunk's elementwise work is compiled too.
- `compile`: `torch.compile` of the decoder for training steps (`compile_layers`): on the CPU every
  layer whole, on CUDA every layer's norms, attention and MLP. The eager PEFT/bitsandbytes step launches
  thousands of small kernels; compiled, the norms, rotary, SwiGLU, dropout and LoRA additions (and on the
  CPU the residual additions) fuse. Gradient checkpointing's recompute stays outside the compiled graphs.
  The collator keeps the shapes static meanwhile (`collator_for` in trainer/engine/dataset.py): every
  micro-batch has `batch_size` rows (packed: of `max_length` tokens), label-less rows filling an epoch's
  short last batch, which used to recompile every block (7 s on an H100, twice in a 2-epoch job). On 2 CPU
  cores (inductor's C++) the real base's LoRA trains 1.07-1.31x faster compiled (three pairs of runs;
  smollm2_135m_lora sets it; bench/cpu_train.py), whole layers 1.06-1.07x more than blocks.
- `attn_implementation: flex_attention` (loaded by trainer/engine/train.py): packed rows hold many short
  conversations; sdpa gets them as a dense block-diagonal [row x row] mask and its masked kernel computes
  every score of the row, while FlexAttention's block mask skips the blocks between conversations
  (~1/30 of the work for 70-token conversations in 2,048-token rows). Training only: sample chats and
  evaluation generate with sdpa (`generate_with_sdpa`), so no compilation per generated length.
- `checkpoint_fraction`: with `gradient_checkpointing`, recompute only the first fraction of the
  decoder layers in backward; the rest keep their activations (less recompute, more memory).

`apply_speedups(model, cfg)` is the one call the training engine makes; bench/train_speed.py measures
what each feature pays on a GPU, bench/cpu_train.py on the CPU, and docs/BENCHMARKS.md records it.
"""
from __future__ import annotations

import functools
import logging
import os
import types

import torch
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from inference.decode_step import compile_failure

log = logging.getLogger("trainer")

IGNORE_INDEX = -100
# Architectures whose logits are exactly `lm_head(last_hidden_state)` (no soft-capping, scaling or
# bias), so the chunked loss is the same function as theirs.
FUSED_LOSS_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "phi3", "olmo2"}
FUSED_CHUNKS_ENV = "OWN_ASSISTANT_FUSED_CHUNKS"   # =eager: the loss's chunks stay eager under `compile` (benchmarks)
CHUNK_ELEMENTS = 2**28          # logits elements per chunk: 1 GiB in fp32


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), one row chunk at a time; with BASE_HIDDEN [k, d] also
    kl_weight x sum_{j<k} KL(softmax(base_j @ weight.T) || softmax(hidden_j @ weight.T)) on the first k rows.

    The gradient is computed chunk by chunk in the forward pass (the chunk's logits are dropped right
    after), and backward only scales it: peak memory is one chunk of logits, not all of them. The KL
    term (`retain_kl`, trainer/engine/retain.py) is on rows the cross-entropy reads anyway, so it shares
    their logits, log-softmax and gradient matmul: per such row 3 vocabulary matmuls instead of 5 when
    the two losses were computed apart; its rows come first so that each chunk's are one slice of it,
    no gathers. The output embedding gets no gradient from the KL (frozen where `retain_kl` runs: LoRA).
    Returns (total, kl_sum): total = CE sum + kl_weight x KL sum; kl_sum for logging, no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, base_hidden=None, kl_weight=None, math=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)     # fp32 for bf16/fp16/fp32 inputs
        total = torch.zeros((), dtype=acc, device=hidden.device)
        kl_sum = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        n_kl = 0 if base_hidden is None else base_hidden.shape[0]
        if n_kl and need_w:
            raise ValueError("the KL term needs a frozen output embedding")
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            k = max(0, min(n_kl - start, h.shape[0]))         # this chunk's KL rows: its first k
            logits = h @ weight.t()
            base = base_hidden[start:start + k] @ weight.t() if k else None
            out = None
            if math is not None:                              # the compiled chunk (chunk_math)
                try:
                    out = math(logits, t, base, kl_weight)
                except torch._dynamo.exc.BackendCompilerFailed as exc:    # no compiler, or a new shape's failed
                    log.warning("fused_loss: compiling its chunk failed (%s) -- eager chunks", compile_failure(exc))
                    _compiled_math["fn"] = math = None
            ce, kl, grad = out or chunk_math_in_place(logits, t, base, kl_weight, need_grad=need_h or need_w)
            total += ce
            if k:
                total += kl_weight * kl
                kl_sum += kl
            if need_h:
                grad_h[start:start + chunk_rows] = grad @ weight
            if need_w:
                grad_w += (grad.t() @ h).to(acc)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kl_sum)
        return total, kl_sum

    @staticmethod
    def backward(ctx, grad_out, _grad_kl=None):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out if ctx.has[0] else None      # stays in the hidden dtype
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_h, grad_w, None, None, None, None, None


def chunk_math(logits, targets, base_logits, kl_weight):
    """One chunk's elementwise work (what ChunkedLinearCrossEntropy's eager loop does in place) as a pure
    function for torch.compile, which fuses it into about two passes over the logits where eager makes
    about seven over an fp32 copy: 24 against 88 ms for 400 rows of SmolLM2's 49,152-word vocabulary on 2
    CPU cores. Returns (CE sum, KL sum over the first len(base_logits) rows, d(CE + w KL)/d(logits))."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    logp = x - torch.logsumexp(x, -1, keepdim=True)
    ce = -logp.gather(1, targets[:, None]).sum()
    p = logp.exp()
    grad = p - (torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]).to(acc)
    if base_logits is None:
        return ce, torch.zeros((), dtype=acc, device=x.device), grad.to(logits.dtype)
    k = base_logits.shape[0]
    base_logp = torch.log_softmax(base_logits.to(acc), -1)
    p_base = base_logp.exp()
    kl = (p_base * (base_logp - logp[:k])).sum()
    grad = torch.cat([grad[:k] + kl_weight * (p[:k] - p_base), grad[k:]])
    return ce, kl, grad.to(logits.dtype)


def chunk_math_in_place(logits, targets, base_logits, kl_weight, need_grad: bool = True):
    """chunk_math as eager runs it best: in place over one fp32 copy of the logits (like lm_head(h).float() in
    transformers' loss), the KL as two dot products; no gradient (None) where NEED_GRAD is off."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=-1)
    ce = (lse - x.gather(1, targets[:, None]).squeeze(1)).sum()
    kl = torch.zeros((), dtype=acc, device=x.device)
    if not need_grad and base_logits is None:
        return ce, kl, None
    logp = x.sub_(lse[:, None])                                         # log-softmax, in place
    if base_logits is not None:
        k = base_logits.shape[0]
        base_logp = base_logits.to(acc).log_softmax(-1)
        p_base = base_logp.exp()
        flat = p_base.view(-1)            # sum p_base (log p_base - log p_tuned), as two dot products
        kl = torch.dot(flat, base_logp.view(-1)) - torch.dot(flat, logp[:k].reshape(-1))
    if not need_grad:
        return ce, kl, None
    grad = logp.exp_()                                                  # softmax, in place
    if base_logits is not None:            # d(CE + w KL) / d(logits) = p - onehot + w (p - p_base)
        grad[:k].mul_(1 + kl_weight).sub_(p_base.mul_(kl_weight))
    grad[torch.arange(targets.shape[0], device=targets.device), targets] -= 1      # d(sum CE) / d(logits)
    return ce, kl, grad.to(logits.dtype)


_compiled_math = {}


def compiled_chunk_math():
    """chunk_math compiled once per process (dynamic shapes: any chunk and vocabulary size), or None once compiling
    it failed here (no C++ compiler for inductor on a CPU): the loss then runs chunk_math_in_place."""
    if "fn" not in _compiled_math:
        _compiled_math["fn"] = torch.compile(chunk_math, dynamic=True)
    return _compiled_math["fn"]


def fused_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch=None, chunk_rows: int | None = None, kl: dict | None = None,
                         math=None) -> torch.Tensor:
    """transformers' ForCausalLMLoss (shift by one, ignore -100, mean or sum / num_items_in_batch)
    computed from hidden states and the output embedding, without materialising the logits.

    KL: `{"where": [rows, T] bool, "base_hidden": [n, d], "scale": s}` adds s x sum KL(base || tuned) at
    the WHERE positions (labelled ones, in row-major order; BASE_HIDDEN the base's last hidden states
    there), computed with the cross-entropy's own logits; its sum (no gradient) is put in kl["sum"].
    MATH: `compiled_chunk_math()` for the compiled chunks, None for chunk_math_in_place."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    labelled = shifted != IGNORE_INDEX
    if kl is None:
        keep = labelled.nonzero().squeeze(1)    # only labelled rows reach the vocabulary
    else:                                       # the KL rows first, then the other labelled ones
        where = kl["where"].reshape(-1).to(hidden.device)
        if bool((where & ~labelled).any()) or int(where.sum()) != kl["base_hidden"].shape[0]:
            raise RuntimeError("retain_kl: the base's hidden states do not line up with the labelled positions")
        keep = torch.cat([where.nonzero().squeeze(1), (labelled & ~where).nonzero().squeeze(1)])
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    if num_items_in_batch is None:
        denom = keep.numel()                    # nan on no labelled token, like cross_entropy's mean
    else:
        denom = num_items_in_batch.to(hidden.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    extra = (None, None)
    if kl is not None:
        w = kl["scale"] * denom             # a tensor, so a compiled chunk sees a new weight, not a new constant
        acc = torch.promote_types(rows.dtype, torch.float32)
        extra = (kl["base_hidden"].to(rows.dtype), torch.as_tensor(w, dtype=acc, device=hidden.device))
    total, kl_sum = ChunkedLinearCrossEntropy.apply(rows, weight, shifted.index_select(0, keep), chunk_rows, *extra,
                                                    math)
    if kl is not None:
        kl["sum"] = kl_sum
    return total / denom


def causal_lm(model):
    """The `...ForCausalLM` module under PEFT / wrappers (the one that owns `lm_head`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner


def enable_fused_loss(model, compiled: bool = False) -> bool:
    """Give the causal-LM module a forward that computes the loss with `fused_causal_lm_loss` when
    labels are passed (training); without labels (generation, sample chats) the original runs.
    COMPILED: its chunks' elementwise work compiled (`compile: true`; `chunk_math`)."""
    lm = causal_lm(model)
    model_type = getattr(lm.config, "model_type", "")
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if (model_type not in FUSED_LOSS_MODEL_TYPES or head is None or getattr(head, "bias", None) is not None
            or not hasattr(lm, "get_decoder")):
        log.warning("fused_loss: not supported for model type %r -- using the standard loss", model_type)
        return False
    plain_forward = lm.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, retain_kl=None, **kwargs):
        if labels is None:
            return plain_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 **kwargs)
        for unused in ("logits_to_keep", "return_dict", "output_attentions", "output_hidden_states"):
            kwargs.pop(unused, None)
        out = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 **kwargs)
        loss = fused_causal_lm_loss(out.last_hidden_state, self.get_output_embeddings().weight, labels,
                                    num_items_in_batch, kl=retain_kl,   # retain_kl: trainer/engine/retain.py
                                    math=compiled_chunk_math() if self.fused_loss_compiled else None)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    lm.forward = types.MethodType(forward, lm)
    lm.fused_loss = True           # RetainTrainer hands its KL term to this loss (shared logits)
    lm.fused_loss_compiled = compiled
    return True


def decoder_layers(model) -> list:
    decoder = causal_lm(model).get_decoder()
    return list(getattr(decoder, "layers", []))


COMPILED_BLOCKS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
COMPILE_UNIT_ENV = "OWN_ASSISTANT_COMPILE_UNIT"   # layer | blocks: overrides the device's unit (benchmarks)


def compile_layers(model, backend: str = "inductor", unit: str | None = None) -> int:
    """torch.compile the decoder for training steps only, layer by layer: on the CPU each layer's forward
    whole (norms, attention, MLP and the residual additions between them, as torchtune compiles its layers:
    1.06-1.07x a step over the blocks on 2 EPYC cores, docs/BENCHMARKS.md "Session 18"); on CUDA each
    layer's norms, attention and MLP apart (UNIT "blocks", measured there since session 2; a whole LoRA layer
    failed inside inductor's backward on torch 2.11 in session 6, and whole layers are not yet measured there).

    The compiled forward is used while the module trains with gradients on; generation (sample chats,
    evaluation) and the KL term's base pass keep the eager forward, so they never trigger a second,
    inference-mode compilation. transformers wraps a layer class's forward in its gradient checkpointing
    (`GradientCheckpointingLayer`); a whole layer compiles the forward inside that wrapper and is
    checkpointed here around it, as there, so the recompute stays outside the compiled graph (blocks sit
    inside the layer's own checkpoint). `dynamic=True`: packed batches vary in width, and one symbolic-shape
    graph serves them all (and all layers) instead of a recompile per width. Parameters and state-dict keys
    are untouched, so adapters and checkpoints save as usual. If compiling fails (a CPU machine without a
    C++ compiler), the first module to try says why in the log and every one runs eager from then on: the
    run goes on at eager speed. Returns the number of modules switched."""
    layers = decoder_layers(model)
    if unit is None:
        on_cpu = bool(layers) and next(layers[0].parameters()).device.type == "cpu"
        unit = os.environ.get(COMPILE_UNIT_ENV) or ("layer" if on_cpu else "blocks")
    n, shared = 0, {"failed": None}
    for layer in layers:
        for part in [layer] if unit == "layer" else [getattr(layer, name, None) for name in COMPILED_BLOCKS]:
            if isinstance(part, torch.nn.Module) and not hasattr(part, "_eager_forward"):
                _compile_forward(part, backend, shared)
                n += 1
    return n


def _compile_forward(module, backend: str, shared: dict) -> None:
    wrapped = getattr(type(module).forward, "__wrapped__", None)
    module._checkpoints_here = isinstance(module, GradientCheckpointingLayer) and wrapped is not None
    module._eager_forward = module.forward              # the class's: checkpointing wrapper and all
    module._inner_forward = types.MethodType(wrapped, module) if module._checkpoints_here else module.forward
    module._compiled_forward = torch.compile(module._inner_forward, dynamic=True, backend=backend)
    module._compile_state = shared
    module.forward = types.MethodType(_train_compiled_forward, module)


def _train_compiled_forward(self, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()) or self._compile_state["failed"] is not None:
        return self._eager_forward(*args, **kwargs)
    if self._checkpoints_here and self.gradient_checkpointing:
        kwargs = {**kwargs, "use_cache": False} if "use_cache" in kwargs else kwargs
        return self._gradient_checkpointing_func(functools.partial(_compiled_or_eager, self, **kwargs), *args)
    return _compiled_or_eager(self, *args, **kwargs)


def _compiled_or_eager(self, *args, **kwargs):
    if self._compile_state["failed"] is None:
        try:
            return self._compiled_forward(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:      # compiling, not the step itself, failed
            self._compile_state["failed"] = compile_failure(exc)
            log.warning("compile: %s -- training on without it (eager)", self._compile_state["failed"])
    return self._inner_forward(*args, **kwargs)


def limit_checkpointing(model, fraction: float) -> int:
    """Keep gradient checkpointing on the first `fraction` of the layers only; returns how many."""
    layers = decoder_layers(model)
    keep = round(fraction * len(layers))
    for i, layer in enumerate(layers):
        if i >= keep and hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = False
    return keep


def generate_with_sdpa(model) -> bool:
    """Make `generate` on a flex_attention model switch to sdpa for the call and back after it."""
    lm = causal_lm(model)
    if getattr(lm.config, "_attn_implementation", None) != "flex_attention" or hasattr(lm, "_flex_generate"):
        return False
    lm._flex_generate = lm.generate

    def generate(self, *args, **kwargs):
        self.set_attn_implementation("sdpa")
        try:
            return self._flex_generate(*args, **kwargs)
        finally:
            self.set_attn_implementation("flex_attention")

    lm.generate = types.MethodType(generate, lm)
    return True


def apply_speedups(model, cfg, echo=None):
    """Switch on the speed features `cfg` asks for; returns the model (changed in place)."""
    notes = []
    if generate_with_sdpa(model):
        notes.append("flex attention for training steps")
    # with `compile`, the loss's chunks compiled too: 1.07-1.36x a CPU step with the KL term (docs/BENCHMARKS.md
    # "Session 17"), 1.014x the QLoRA preset's H100 step ("Session 18"), the same losses. The environment's
    # FUSED_CHUNKS_ENV=eager keeps them eager while the decoder compiles: a switch for benchmarks (bench/gpu_stages)
    chunks = getattr(cfg, "compile", False) and os.environ.get(FUSED_CHUNKS_ENV, "compiled") != "eager"
    if getattr(cfg, "fused_loss", False) and enable_fused_loss(model, compiled=chunks):
        notes.append("fused chunked loss" + (" (chunks compiled)" if chunks else ""))
    if getattr(cfg, "gradient_checkpointing", False) and getattr(cfg, "checkpoint_fraction", 1.0) < 1.0:
        kept = limit_checkpointing(model, cfg.checkpoint_fraction)
        notes.append(f"checkpointing {kept}/{len(decoder_layers(model))} layers")
    if getattr(cfg, "compile", False):
        notes.append(f"compiled {compile_layers(model)} decoder modules")
    if notes and echo:
        echo("speed: " + ", ".join(notes))
    return model
