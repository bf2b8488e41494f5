"""Chat generation on a loaded model: `ChatEngine.stream_chat` yields the growing reply.

One engine serves the CLI chat, the Gradio app, the Streamlit demo, the sample chats during training
and the evaluation, so they all see the same prompt: the tokenizer's chat template plus the system
prompt saved with the model. Long conversations are trimmed oldest-turn-first to fit the context.
Generation is serialised with a lock, so concurrent callers (a Gradio queue) are safe.
"""
from __future__ import annotations

import threading
from typing import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from inference.chat_format import prompt_ids, with_system


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the template's `<|im_end|>` (when present) and eos."""
    ids = set()
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def context_limit(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def fit_to_context(tokenizer, messages: list[dict], budget: int) -> tuple[list[int], list[dict]]:
    """Prompt ids within `budget` tokens: drop the oldest user/assistant pairs (the system message
    and the newest user turn stay); as a last resort keep only the newest tokens."""
    msgs = list(messages)
    while True:
        ids = prompt_ids(tokenizer, msgs)
        if len(ids) <= budget:
            return ids, msgs
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            return ids[-budget:], msgs
        del msgs[first:first + 2]


class _Cancelled(StoppingCriteria):
    """Stops every row of a `generate` call once EVENT is set (checked after each new token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    def __init__(self, model, tokenizer, system_prompt: str | None = None, max_context: int | None = None,
                 fast_decode: bool | str = False):
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_context = max_context or context_limit(model)
        self.stop = stop_ids(model, tokenizer)
        self._lock = threading.Lock()
        # opt-in, CUDA only: static cache + CUDA-graph decode (inference/fast_decode.py); CPU keeps generate.
        # True is "compile" (the fused step; models it cannot handle fall back to "graph").
        self.fast = None
        mode = "compile" if fast_decode is True else fast_decode or None
        if mode not in (None, "graph", "compile"):
            raise ValueError(f"fast_decode={fast_decode!r}: expected True, False, 'graph' or 'compile'")
        if mode and self.model.device.type == "cuda":
            from inference.fast_decode import StaticDecoder

            self.fast = StaticDecoder(model, max_len=min(self.max_context, 4096), mode=mode)

    def _gen_kwargs(self, max_new_tokens, temperature, top_p, repetition_penalty) -> dict:
        kw = dict(max_new_tokens=max_new_tokens, eos_token_id=self.stop,
                  pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop[0],
                  repetition_penalty=repetition_penalty)
        if temperature and temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def prepare(self, messages: list[dict], system_prompt: str | None, max_new_tokens: int) -> torch.Tensor:
        system = self.system_prompt if system_prompt is None else system_prompt
        msgs = with_system(messages, system or None)
        ids, _ = fit_to_context(self.tokenizer, msgs, max(16, self.max_context - max_new_tokens))
        return torch.tensor([ids], device=self.model.device)

    # torch.no_grad, not inference_mode: the same model keeps training after a sample chat, and tensors
    # created under inference_mode (e.g. FSDP's cached params) cannot be saved for backward later.

    def stream_chat(self, messages: list[dict], *, system_prompt: str | None = None, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 0.9, repetition_penalty: float = 1.0) -> Iterator[str]:
        """Yield the reply so far, growing, until an end token or `max_new_tokens`.

        `system_prompt=None` uses the one saved with the model; "" means none."""
        input_ids = self.prepare(messages, system_prompt, max_new_tokens)
        # the fast path samples with temperature + top-p only: a model whose generation config adds top_k
        # (Qwen2 ships 20) samples through generate, so CPU and GPU draw from the same distribution
        top_k = getattr(getattr(self.model, "generation_config", None), "top_k", None)
        if (self.fast is not None and repetition_penalty == 1.0 and not (temperature and top_k)
                and self.fast.fits(input_ids.shape[1] + max_new_tokens)):
            from inference.fast_decode import stream_text

            with self._lock:
                yield from stream_text(self.tokenizer, self.fast.tokens(input_ids, max_new_tokens, self.stop,
                                                                        temperature, top_p))
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs = self._gen_kwargs(max_new_tokens, temperature, top_p, repetition_penalty)
        errors: list[BaseException] = []
        stop = threading.Event()       # set when the consumer goes away (Stop pressed, client disconnected)

        def run():
            try:
                with self._lock, torch.no_grad():
                    self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled(stop)]),
                                        **kwargs)
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yield text
        finally:
            # a consumer that stops early (generator closed) ends generation within one token, so the
            # lock goes to the next user instead of serving max_new_tokens to nobody
            stop.set()
        thread.join()
        if errors:
            raise errors[0]

    def chat(self, messages: list[dict], **kwargs) -> str:
        """The whole reply at once (greedy by default)."""
        reply = ""
        for reply in self.stream_chat(messages, **kwargs):
            pass
        return reply

    def greedy_ids(self, messages: list[dict], max_new_tokens: int = 32, system_prompt: str | None = None) -> list[int]:
        """Generated token ids, greedy: for exact comparisons (merge == base + adapter)."""
        input_ids = self.prepare(messages, system_prompt, max_new_tokens)
        with self._lock, torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      **self._gen_kwargs(max_new_tokens, 0, None, 1.0))
        return out[0, input_ids.shape[1]:].tolist()
