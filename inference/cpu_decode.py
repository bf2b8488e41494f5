"""Int8 / int4 weights for decoding on CPU: a copy of the model whose linear layers hold them.

    from inference.cpu_decode import decode_model
    fast = decode_model(model, "int4")        # "fp32": the model itself; "int8" / "int4": a copy, weights shared
    loaded.engine()                           # the serving engines: int4 for a causal LM of 50M+ parameters on the
                                              # CPU, else fp32; env CPU_DECODE=fp32|int8|int4 chooses (loader.py)
    python bench/batch_decode.py --model smollm2 --impl generate --cpu-weights fp32,int8,int4 --streams 1,4

Why: one decoded token reads every weight once. The real embedded base (SmolLM2-135M) reads ~540 MB
a token in fp32 -- its lm_head alone (tied to the 49,152 x 576 embedding) is 113 MB -- and 2 CPU cores
decode it at ~27 tokens/s. Int8 weights read a quarter of that.

What: every `nn.Linear` (the lm_head included; the embedding stays fp32, it is read one row a token)
becomes `Int8Linear`: weight-only, symmetric, one scale per output row, computed by torch's own
`_weight_int8pack_mm` (an AVX-512/AMX kernel on x86) on bf16 activations, the result cast back. Only
the weights are rounded; activations are not quantized to int8 -- torch's `quantize_dynamic` (which
does) turned most of SmolLM2's replies to gibberish (8 held-out prompts). The copy shares every other
tensor with the model (no second fp32 copy) and is a snapshot: a model that trains on needs a new one.
Quality is not fp32's: greedy replies agree with fp32 for a while, then may part (bench/quant_agreement.py
measures it on the bundled held-out prompts).

`int4` (`Int4Linear`): 4-bit weights in groups of 32 along the input, each group with its own scale and
offset (w = q x scale + min, q in 0..15: llama.cpp's Q4_1, the very format the embedded base ships in), run
by torch's `_weight_int4pack_mm_for_cpu` on bf16 activations (its fp32 / fp16 paths are ~30x slower
here); the output layer is `ShortlistHead`: all logits in 4 bits, the best 64 of them recomputed from its fp32
weights (half the int8 layer's time, and fp32's greedy pick). An eighth of fp32's bytes: for the real base on
2 EPYC cores `generate` runs 52 tokens/s against fp32's 18 and int8's 44 (docs/BENCHMARKS.md "Session 12: int4
weights"); a fine-tuned model, with the residual below, 42 through `generate` and 34 through the apps' serving path
(int8 32, fp32 18: "Session 13"; the output layer then still int8), 37 with the shortlist below and 44 once the
serving step is compiled (inference/row_step.py, "Session 16").
Layers whose input width is not a multiple of 32 or output width not one of 16 stay as they are (an output
layer of that kind takes int8).

What 4 bits lose is put back where it is low-rank: `Int4Linear` also keeps the top singular directions of
W - dequant(quant(W)) when they hold most of it (`RESIDUAL_RANK`, `RESIDUAL_SHARE`), added in fp32 at run time.
Why: a model fine-tuned from the embedded base and merged is the base -- whose weights already sit on the
Q4_1 grid -- plus a LoRA delta smaller than half a 4-bit step; rounded to 4 bits again it snapped back to the
base: the demo's merged model decoded in plain int4 scored identity 0.00 against 0.96 in fp32 (held-out set,
2026-12-07). The residual there is the LoRA delta plus re-rounding error of about its size (the merged weights'
groups get a slightly shifted grid, and the kernel's scales are bf16 where the GGUF's are fp16), so its top
directions mix the two: it is kept at up to 32 directions even for a rank-16 LoRA (a rank-4 delta on a 4-bit grid
keeps a 0.75 cosine of its effect at 4 directions, 0.93 at 32; docs/BENCHMARKS.md "Session 15"). For a model not on
the grid the residual is mostly rounding noise, spread over all directions, and is dropped (LoftQ, Li et al. 2023,
splits a weight into 4 bits plus a low-rank part the same way, for training).
"""
from __future__ import annotations

import copy

import torch

CHOICES = ("fp32", "int8", "int4")
GROUP = 32          # int4: weights per (scale, offset) pair, as llama.cpp's Q4_0 / Q4_1
RESIDUAL_RANK = 32  # int4: at most this many singular directions of the rounding residual kept (LoRA ranks <= 32)
RESIDUAL_SHARE = 0.5  # ... and only when they hold at least this share of its energy (low-rank, not noise)
SHORTLIST = 64      # int4 output layer: the tokens with the best 4-bit logits whose logits are recomputed in fp32


def check(choice: str) -> str:
    """The choice, or a one-line ValueError naming the ones there are."""
    if choice not in CHOICES:
        raise ValueError(f"cpu_decode={choice!r}: expected one of {', '.join(map(repr, CHOICES))}")
    return choice


class WeightOnlyLinear(torch.nn.Module):
    """y = x W^T (+ b) with W rounded to fewer bits: `_mm` multiplies bf16 rows by the stored weights."""

    bits = 0

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.down = self.up = None      # a low-rank correction added to the product (Int4Linear's residual)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        y = self._mm(rows.to(torch.bfloat16)).to(x.dtype)
        if self.down is not None:       # one fused multiply-add
            y = torch.addmm(y, rows @ self.down, self.up)
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        extra = f", low-rank residual {self.down.shape[1]}" if self.down is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} weight-only{extra}"


class Int8Linear(WeightOnlyLinear):
    """W stored as int8 [out, in] with one bf16 scale per output row."""

    bits = 8

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
                             .contiguous())
        self.register_buffer("scales", scale.to(torch.bfloat16))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight_int8, self.scales)


def int4_rounding(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] in 4 bits, groups of GROUP inputs: (q [out, in] int32 in 0..15, scale_zero [groups, out, 2]
    bf16 as torch's CPU int4 kernel takes them, the weights that kernel computes with)."""
    out_f, in_f = w.shape
    groups = w.reshape(out_f, in_f // GROUP, GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    # the kernel computes (q - 8) x scale + zero: zero = low + 8 x scale; layout [groups, out, 2]
    scale_zero = torch.stack([scale, low + 8 * scale], dim=-1).to(torch.bfloat16)
    sz = scale_zero.float()
    rounded = ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(out_f, in_f)
    return q.reshape(out_f, in_f), scale_zero.transpose(0, 1).contiguous(), rounded


class Int4Linear(WeightOnlyLinear):
    """W in 4 bits, groups of GROUP inputs, each with a bf16 scale and offset; plus the low-rank part of what
    the rounding lost, when there is one (`low_rank_residual`)."""

    bits = 4

    def __init__(self, linear: torch.nn.Linear, residual: bool = True):
        super().__init__(linear)
        w = linear.weight.detach().float()
        q, scale_zero, rounded = int4_rounding(w)
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        self.register_buffer("scale_zero", scale_zero)
        if residual:
            self.down, self.up = low_rank_residual(w - rounded)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight_int4, GROUP, self.scale_zero)


class ShortlistHead(Int4Linear):
    """The output layer: every logit from 4-bit weights, then the SHORTLIST best of them recomputed from the
    layer's own fp32 weights (shared with the model, not copied) and put in their place. A greedy pick is then
    the fp32 layer's unless its best token is not among the 4-bit best SHORTLIST (bench/quant_agreement.py counts
    it), and sampling sees exact logits where nearly all of its probability is; the tail keeps 4-bit logits.
    Why: the output layer is a tenth of SmolLM2's weights but a sixth of an int4 token's time at int8
    (49,152 x 576), and where 4 bits show first -- all-int4 lost facts that int8 kept (session 12)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear, residual=False)
        self.exact = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        rows, flat = x.reshape(-1, x.shape[-1]), logits.view(-1, self.out_features)
        top = flat.topk(min(SHORTLIST, self.out_features), dim=-1).indices            # [rows, SHORTLIST]
        exact = torch.einsum("rd,rkd->rk", rows, self.exact[top])
        if self.bias is not None:
            exact = exact + self.bias[top]
        flat.scatter_(1, top, exact.to(flat.dtype))
        return logits


def low_rank_residual(residual: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(down [in, k], up [k, out]) with down @ up ~ RESIDUAL^T, the top k <= RESIDUAL_RANK singular directions
    (and at most an eighth of them), when they hold >= RESIDUAL_SHARE of its energy; (None, None) when it is noise."""
    # at most an eighth of the directions: noise spread evenly over all of them then holds ~1/8 of the energy
    rank = min(RESIDUAL_RANK, min(residual.shape) // 8)
    total = float(residual.square().sum())
    if total == 0.0 or rank == 0:
        return None, None
    with torch.random.fork_rng(devices=[]):      # randomized SVD: the same result every load
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(residual, q=min(rank + 8, *residual.shape), niter=4)
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    energy = s.square().cumsum(0) / total
    if float(energy[-1]) < RESIDUAL_SHARE:
        return None, None
    k = int((energy < float(energy[-1]) * 0.999).sum()) + 1     # drop the directions that add nothing
    return (v[:, :k] * s[:k]).contiguous(), u[:, :k].t().contiguous()


def quantized_copy(model, choice: str = "int8"):
    """A copy of MODEL for decoding whose `nn.Linear` layers are `Int8Linear` or `Int4Linear`; every other
    tensor (the embedding, norms, rotary tables) is the model's own, not copied. MODEL is left as it was."""
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    with torch.no_grad():
        twin = copy.deepcopy(model, memo=shared)
        head = twin.get_output_embeddings() if hasattr(twin, "get_output_embeddings") else None
        for module in list(twin.modules()):
            for name, child in list(module.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                packs = child.in_features % GROUP == 0 and child.out_features % 16 == 0    # the int4 kernel's rule
                if choice == "int8" or (child is head and not packs):
                    setattr(module, name, Int8Linear(child))
                elif not packs:
                    continue
                elif child is head:       # the logits are where rounding shows first: the best ones in fp32
                    setattr(module, name, ShortlistHead(child))
                else:
                    setattr(module, name, Int4Linear(child))
    twin.eval()
    return twin


def default_choice(model, min_params: int) -> str:
    """"int4" for a plain transformers causal LM (not a PEFT wrapper, not the LLaVA wrapper) of at least MIN_PARAMS
    parameters whose CPU int4 kernel is in this torch; "fp32" otherwise. Why a size: int4 pays where reading the
    weights bounds a token (the 135M embedded base: fp32 18, int4 34 tokens/s through the apps); a tiny model is
    bound by dispatch and would only lose precision. Unmerged adapters stay fp32: `quantized_copy` would round
    their LoRA factors as if they were weights (merge first: `trainer merge`)."""
    from transformers import PreTrainedModel

    causal = isinstance(model, PreTrainedModel) and type(model).__name__.endswith("ForCausalLM")
    peft = hasattr(model, "peft_config")
    kernel = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    big = sum(p.numel() for p in model.parameters()) >= min_params
    return "int4" if causal and not peft and kernel and big else "fp32"


def decode_model(model, choice: str = "fp32"):
    """The model to decode with on CPU: MODEL itself for "fp32", `quantized_copy(MODEL, choice)` else."""
    check(choice)
    if choice == "fp32":
        return model
    device = getattr(model, "device", torch.device("cpu"))
    if device.type != "cpu":
        raise ValueError(f"cpu_decode={choice!r} is for a model on the CPU (this one is on {device})")
    if getattr(model, "is_quantized", False):
        raise ValueError(f"cpu_decode={choice!r}: the model is already quantized (bitsandbytes); load it unquantized")
    if model.dtype != torch.float32:
        raise ValueError(f"cpu_decode={choice!r} expects fp32 weights to round (got {model.dtype})")
    return quantized_copy(model, choice)
