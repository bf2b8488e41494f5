"""Keep the base's behaviour on general conversations: a KL term toward the base model (`retain_kl`).

    python -m trainer train smollm2_135m_lora --data data/me.jsonl --set retain_kl=1.0

Training on the base's own greedy answers (`trainer data --mix self`) teaches only each answer's top token;
it does not stop the adapter from moving probability toward the new name everywhere else, and that is how
the name leaked into held-out general answers ("known as the Leander or the Lumi", "a bird named Lumi").
Here, on the answer tokens of the conversations the data mix marked `"retain": true` (the general ones,
`trainer/data/mix.py`), the loss adds `retain_kl` x KL(base || tuned) over the whole vocabulary, the
distillation term of Learning without Forgetting (Li & Hoiem, 2016) and of on-policy distillation.

Where the general answer is the base's answer to another prompt -- `trainer data --mix self` asks a base
that speaks no Chinese each Chinese prompt's English twin and pairs its English answer with the Chinese
prompt -- the record says so (`"base_prompt": TWIN`), and the reference is the base's distribution after
the twin, over the same answer tokens: the base given the Chinese prompt itself would pull the answer
back toward its broken Chinese (tried: the name then leaked into 10 of 56 Chinese held-out answers).

The base distribution costs one extra forward pass without gradients, with the LoRA adapters switched off
(PEFT's `disable_adapter`), over the rows that hold such tokens -- no second copy of the weights -- in the
first epoch only (its hidden states there are kept). With `fused_loss` the KL goes into the chunked
cross-entropy (trainer/engine/speed.py), which computes the tuned logits of those positions anyway: the
two losses share them, their softmax and the gradient matmul. Without it the tuned side reuses the training
forward's last hidden states (caught by a forward hook on the decoder, so it composes with compile and DDP).
Either way KL is computed from the hidden states in row chunks, its gradient made in the same pass, so the
[tokens x vocab] logits of either model never all exist.
Not in TRL / PEFT as a training term for SFT (TRL's GKD trainer distils from a separate teacher model and
generates on-policy), hence by hand.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from transformers import Trainer

from inference.chat_format import encode_chat, with_system
from trainer.engine.speed import CHUNK_ELEMENTS, IGNORE_INDEX, causal_lm


def retain_marks(record: dict, tokenizer, sample: dict, max_length: int, system_prompt: str | None) -> dict:
    """Per-token `retain` marks for an encoded SAMPLE of RECORD; for a record with a `base_prompt`, also
    the base's own inputs (`base_input_ids`, `base_labels`, `base_retain`), marking the same answer tokens."""
    n = len(sample["input_ids"])
    if not record.get("retain"):
        return {"retain": [False] * n}
    if not record.get("base_prompt"):
        return {"retain": [True] * n}
    messages = [dict(m) for m in record["messages"]]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = record["base_prompt"]
    full = encode_chat(tokenizer, with_system(messages, system_prompt))
    ids, labels = full["input_ids"][:max_length], full["labels"][:max_length]
    own = [i for i, t in enumerate(sample["labels"]) if t != IGNORE_INDEX]
    theirs = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    m = min(len(own), len(theirs))          # truncation may cut one more than the other
    if [sample["labels"][i] for i in own[:m]] != [labels[i] for i in theirs[:m]]:
        return {"retain": [False] * n}      # not the same answer tokens: nothing to compare them on
    mark = lambda length, where: [i in where for i in range(length)]
    return {"retain": mark(n, set(own[:m])), "base_input_ids": ids, "base_labels": labels,
            "base_retain": mark(len(ids), set(theirs[:m]))}


def base_view(sample: dict) -> dict:
    """What the base reads for SAMPLE (an encoded conversation or a packed row): its own inputs, unless
    the reference is the base after another prompt (`retain_marks`)."""
    view = {"input_ids": sample.get("base_input_ids", sample["input_ids"]),
            "labels": sample.get("base_labels", sample["labels"]),
            "retain": sample.get("base_retain", sample.get("retain", [False] * len(sample["input_ids"])))}
    if "position_ids" in sample:
        view["position_ids"] = sample.get("base_position_ids", sample["position_ids"])
    return view


class ChunkedKL(torch.autograd.Function):
    """sum_i KL(softmax(base_i W^T) || softmax(tuned_i W^T)), one row chunk at a time.

    As `ChunkedLinearCrossEntropy` (trainer/engine/speed.py): the gradient, (p_tuned - p_base) W per row, is
    made chunk by chunk in the forward pass and only scaled in backward, so the logits are computed once
    and one chunk of them exists at a time (activation checkpointing would compute them twice). W is the
    frozen output embedding: it gets no gradient."""

    @staticmethod
    def forward(ctx, tuned_h, base_h, weight, chunk_rows: int):
        acc = torch.promote_types(tuned_h.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=tuned_h.device)
        grad = torch.empty_like(tuned_h)
        for start in range(0, tuned_h.shape[0], chunk_rows):
            part = slice(start, start + chunk_rows)
            tuned = (tuned_h[part] @ weight.t()).to(acc).log_softmax(-1)
            base = (base_h[part] @ weight.t()).to(acc).log_softmax(-1)
            p_base = base.exp()
            total += (p_base * (base - tuned)).sum()
            grad[part] = ((tuned.exp_() - p_base).to(tuned_h.dtype)) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def kl_to_base(tuned_h, base_h, weight, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed KL(base || tuned) of the next-token distributions at the given hidden states [n, d]."""
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return ChunkedKL.apply(tuned_h, base_h.detach(), weight.detach(), chunk_rows)


def retained_positions(labels: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    """[rows, T] bool: the positions whose next token is a labelled answer token of a retained conversation."""
    nxt = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    nxt_retain = F.pad(retain, (0, 1), value=False)[:, 1:]
    return (nxt != IGNORE_INDEX) & nxt_retain


# The base never changes, so its hidden states at a row's answer tokens are the same every epoch: kept after
# the first, they spare the later epochs' base forward passes (HIDDEN_CACHE_BYTES at most; beyond, recomputed).
HIDDEN_CACHE_BYTES = 512 * 1024 ** 2
BASE_INPUTS = ("input_ids", "attention_mask", "position_ids")     # what the base's forward pass reads of a batch


def row_keys(base: dict, rows: torch.Tensor, where: torch.Tensor) -> list[bytes]:
    """For each of ROWS: what the base reads there (its unpadded token ids, and positions for packed rows) and
    where it is asked (WHERE, that row's marked positions): two rows can read the same ids -- an English prompt
    and a Chinese one whose twin it is -- with different answer tokens marked (truncation cut them apart)."""
    parts = {k: base[k][rows].cpu() for k in BASE_INPUTS if k in base}
    where = where.cpu()                         # one copy to the host for the batch, not one per row
    keys = []
    for i in range(len(rows)):
        keep = parts["attention_mask"][i].bool() if "attention_mask" in parts else slice(None)
        h = hashlib.blake2b(parts["input_ids"][i][keep].numpy().tobytes(), digest_size=16)
        h.update(where[i][keep].numpy().tobytes())
        if "position_ids" in parts:
            h.update(parts["position_ids"][i][keep].numpy().tobytes())
        keys.append(h.digest())
    return keys


class RetainTrainer(Trainer):
    """transformers' Trainer plus `retain_kl` x KL(base || tuned) on the retained conversations' answers."""

    def __init__(self, *args, retain_kl: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.retain_kl = retain_kl
        self._kl_logged, self._kl_count = 0.0, 0
        self._hidden = None
        self._base_hidden: dict[bytes, torch.Tensor] = {}     # row_keys -> the base's hidden states there
        self._cached_bytes = 0
        self.base_forwards = 0                                 # rows the base read (the cache spares the rest)
        if retain_kl > 0:
            causal_lm(self.model).get_decoder().register_forward_hook(self._catch_hidden)

    def _catch_hidden(self, module, args, output):
        self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        retain = inputs.pop("retain", None)
        base = {k[len("base_"):]: inputs.pop(k) for k in list(inputs) if k.startswith("base_")}
        where = None
        if retain is not None and self.retain_kl > 0 and model.training:
            where = retained_positions(inputs["labels"], retain.bool())
        if where is None or not where.any():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._hidden = None
            return result
        base = base or {**inputs, "retain": retain}
        base_where = retained_positions(base["labels"], base["retain"].bool())
        rows = where.any(dim=1).nonzero().squeeze(1)
        if base_where[rows].sum(dim=1).tolist() != where[rows].sum(dim=1).tolist():
            raise RuntimeError("retain_kl: the base's and the tuned model's answer tokens do not line up")
        base_h = self._base_states(model, base, rows, base_where[rows])
        n = where.sum()
        scale = self.retain_kl / n
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            scale = scale / self.current_gradient_accumulation_steps     # the Trainer will not divide this loss
        peft_model = self.accelerator.unwrap_model(model)
        lm = causal_lm(peft_model)
        if getattr(lm, "fused_loss", False) and not lm.get_output_embeddings().weight.requires_grad:
            # the fused loss computes the KL from its own logits of these positions (trainer/engine/speed.py)
            kl = {"where": where, "base_hidden": base_h, "scale": scale}
            result = super().compute_loss(model, {**inputs, "retain_kl": kl}, return_outputs, num_items_in_batch)
            self._hidden = None
            self._log_kl(kl["sum"].detach() / n)
            return result
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        tuned_h, self._hidden = self._hidden, None
        kl = kl_to_base(tuned_h[rows][where[rows]], base_h, lm.get_output_embeddings().weight)
        self._log_kl(kl.detach() / n)
        loss = result[0] if return_outputs else result
        loss = loss + scale * kl
        return (loss, result[1]) if return_outputs else loss

    def _log_kl(self, kl_mean: torch.Tensor) -> None:
        self._kl_logged += kl_mean              # a tensor: no host sync per step, only at logging
        self._kl_count += 1

    def _base_states(self, model, base, rows, where) -> torch.Tensor:
        """The base's last hidden states [n, d] at WHERE (rows ROWS of the base's inputs BASE), row by row in
        order: kept from an earlier epoch, else one forward pass without gradients, adapters off."""
        peft_model = self.accelerator.unwrap_model(model)
        keys = row_keys(base, rows, where)
        hidden = [self._base_hidden.get(k) for k in keys]
        todo = [i for i, h in enumerate(hidden) if h is None]
        if todo:
            sub = {k: base[k][rows[todo]] for k in BASE_INPUTS if k in base}
            with torch.no_grad(), peft_model.disable_adapter():
                base_h = causal_lm(peft_model).get_decoder()(**sub).last_hidden_state
            self._hidden = None
            self.base_forwards += len(todo)
            dtype = causal_lm(peft_model).get_output_embeddings().weight.dtype
            for j, i in enumerate(todo):
                hidden[i] = base_h[j][where[i]].to(dtype)
                if self._cached_bytes + hidden[i].nbytes <= HIDDEN_CACHE_BYTES:
                    self._base_hidden[keys[i]] = hidden[i]
                    self._cached_bytes += hidden[i].nbytes
        return torch.cat(hidden)

    def log(self, logs, *args, **kwargs):
        if self._kl_count and "loss" in logs:
            logs["retain_kl"] = round(float(self._kl_logged) / self._kl_count, 5)
            self._kl_logged, self._kl_count = 0.0, 0
        super().log(logs, *args, **kwargs)
