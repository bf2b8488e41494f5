"""Chat generation on a loaded model: `ChatEngine.stream_chat` yields the growing reply.

One engine serves the CLI chat, the Gradio app, the Streamlit demo, the sample chats during training
and the evaluation, so they all see the same prompt: the tokenizer's chat template plus the system
prompt saved with the model. Long conversations are trimmed oldest-turn-first to fit the context.

Serving engines (`max_batch` > 1: the app, the Streamlit demo, the API) decode concurrent chats together
in one running batch (inference/batching.py). Otherwise generation is serialised with a lock; on every
path the lock is held by a worker thread, never across a `yield`, and a consumer that goes away (Stop
pressed, client disconnected) ends its generation within one token. Sampling is the same on every
path: temperature, top-p and an explicit top-k (the model's own generation config's, else off).
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from inference.chat_format import prompt_ids, with_system
from inference.device import use_decode_threads


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


log = logging.getLogger(__name__)

# Rows decoded together by a serving engine (app, Streamlit demo, API): 4 streams of the real base on
# 2 CPU cores give 2.3x the tokens/s of one (bench/serve_load.py, docs/BENCHMARKS.md).
SERVING_BATCH = 8


class _Cancelled(StoppingCriteria):
    """Stops every row of a `generate` call once EVENT is set (checked after each new token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _IdStreamer(BaseStreamer):
    """`generate`'s streamer hook: each step's new token ids onto a queue (the prompt skipped), turned
    into text by the consumer with the same `stream_text` as the other paths. transformers'
    TextIteratorStreamer decodes inside the generate loop; with it, generate on an H100 ran at 62-64
    ms/token against 22 without (1.8B shape, .whl/diag.py in bench/gpu_suite.sh serve5, 2026-12-06)."""

    def __init__(self, skip_prompt: bool = True):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_skipped = not skip_prompt
        self._ended = False

    def put(self, value):
        if not self._prompt_skipped:          # generate hands over the prompt first
            self._prompt_skipped = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self):
        if not self._ended:
            self._ended = True
            self.queue.put(None)

    def ids(self, timeout: float = 600):
        while (item := self.queue.get(timeout=timeout)) is not None:
            yield item


class ChatEngine:
    def __init__(self, model, tokenizer, system_prompt: str | None = None, max_context: int | None = None,
                 fast_decode: bool | str = False, max_batch: int = 1, batch_decoder: str = "auto",
                 cpu_decode: str = "fp32"):
        # cpu_decode "int8" / "int4": decode with an int8 / int4-weight copy of the model (inference/cpu_decode.py; CPU only)
        from inference.cpu_decode import decode_model

        self.loaded_model = model       # as loaded: the batcher reads prompts with it (faster than int4 over many rows)
        model = decode_model(model, cpu_decode)
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_context = max_context or context_limit(model)
        self.stop = stop_ids(model, tokenizer)
        self._lock = threading.Lock()
        # generation runs in one long-lived worker thread, not a new thread per reply: cuDNN keeps its
        # attention plans per thread, and a fresh thread rebuilt them at every step's new key length --
        # 2.3 ms per attention call instead of 0.055, generate at 57-98 ms/token instead of 18-22 on an
        # H100 (1.8B shape; `bench/batch_decode.py --impl generate thread worker`; docs/BENCHMARKS.md)
        # on the CPU it decodes with one core fewer than torch's default, left to the consumer (device.py)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate",
                                          initializer=use_decode_threads, initargs=(model.device,))
        # top-k is explicit everywhere: the model's generation config's (Qwen2 ships 20), else 0 = off,
        # so generate (whose fallback would be 50), the fast path and the batcher draw alike
        self.top_k = int(getattr(getattr(model, "generation_config", None), "top_k", None) or 0)
        # opt-in, CUDA only: static cache + CUDA-graph decode (inference/fast_decode.py); CPU keeps generate.
        # True is "compile" (the fused step; models it cannot handle fall back to "graph"); "tuned" also tunes its
        # kernels (faster decode, slower first call).
        self.fast = None
        mode = "compile" if fast_decode is True else fast_decode or None
        if mode not in (None, "graph", "compile", "tuned"):
            raise ValueError(f"fast_decode={fast_decode!r}: expected True, False, 'graph', 'compile' or 'tuned'")
        self.batcher = None
        if max_batch > 1:
            self.batcher = self._batcher(max_batch, batch_decoder)
        if mode and self.model.device.type == "cuda":
            from inference.fast_decode import StaticDecoder

            self.fast = StaticDecoder(model, max_len=min(self.max_context, 4096), mode=mode)

    def _batcher(self, max_batch: int, kind: str):
        """kind "slots": fixed cache slots, one compiled graph-replayed step (inference/slot_decode.py; eager
        on CPU); "compiled-slots": the same with the step compiled on any device (CPU: inductor's C++);
        "tuned-slots": "slots" with the step's kernels tuned (decode_step.compile_options; on an H100 no faster,
        docs/BENCHMARKS.md "Session 15"); "dynamic": the model's own forward over a stacked DynamicCache (any
        device); "compiled": the same batcher with its decode step compiled (inference/row_step.py);
        "auto": slots on CUDA for the model families they handle; on the CPU "compiled" for an int8 / int4 copy
        of a family it handles (where Python's share of a step is largest), else dynamic. None: this model is
        served one at a time."""
        from inference import decode_step
        from inference.batching import Batcher, supports
        from inference.slot_batcher import SlotBatcher

        slots = ("slots", "compiled-slots", "tuned-slots")
        if kind not in ("auto", *slots, "dynamic", "compiled"):
            raise ValueError(f"batch_decoder={kind!r}: expected 'auto', 'slots', 'compiled-slots', 'tuned-slots', "
                             "'dynamic' or 'compiled'")
        length = min(self.max_context, 4096)
        if kind in slots or (kind == "auto" and self.model.device.type == "cuda"
                             and not getattr(self.model, "is_quantized", False)  # bnb: no graph
                             and decode_step.unsupported(self.model, length) is None):
            self.max_context = length             # a prompt and its reply must fit one slot
            return SlotBatcher(self.model, self.stop, max_batch=max_batch, lock=self._lock, max_len=length,
                               compile=True if kind == "compiled-slots" else None, tuned=kind == "tuned-slots")
        if not supports(self.model):
            return None
        row_step = None
        if kind == "compiled" or (kind == "auto" and self.model.device.type == "cpu"
                                  and self.model is not self.loaded_model             # the int8 / int4 copy
                                  and decode_step.unsupported(self.model, self.max_context) is None):
            from inference.row_step import RowStep

            row_step = RowStep(self.model, self.max_context)
        return Batcher(self.model, self.stop, max_batch=max_batch, lock=self._lock,
                       prefill_model=self.loaded_model, row_step=row_step)

    def warm_up(self) -> None:
        """Compile what this engine decodes with now rather than on the first visitor's turn: the CUDA decoder
        (1,024-token bucket) or the batcher's compiled CPU step. app.py, web_demo.py and the API call it; a
        failure is logged, not raised (the first request builds it again and falls back if it must)."""
        try:
            if self.fast is not None:
                self.fast.warm_up(1024)
            if self.batcher is not None:
                self.batcher.warm_up()
        except Exception:  # noqa: BLE001 -- serving without the compiled step beats not serving
            log.exception("warming up the decoder failed")

    def _gen_kwargs(self, max_new_tokens, temperature, top_p, repetition_penalty, top_k: int = 0) -> dict:
        kw = dict(max_new_tokens=max_new_tokens, eos_token_id=self.stop,
                  pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop[0],
                  repetition_penalty=repetition_penalty)
        if temperature and temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)   # 0: no top-k
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
                    temperature: float = 0.0, top_p: float = 0.9, top_k: int | None = None,
                    repetition_penalty: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Yield the reply so far, growing, until an end token or `max_new_tokens`.

        `system_prompt=None` uses the one saved with the model; "" means none. `top_k=None`: the
        model's default (see __init__); 0: off. `seed` makes a sampled reply repeatable."""
        input_ids = self.prepare(messages, system_prompt, max_new_tokens)
        top_k = self.top_k if top_k is None else top_k
        from inference.fast_decode import stream_text

        if self.batcher is not None:
            tokens = self.batcher.token_chunks(input_ids[0].tolist(), max_new_tokens, temperature, top_p, top_k,
                                               repetition_penalty, seed)
            try:
                yield from stream_text(self.tokenizer, tokens)
            finally:
                tokens.close()             # the consumer went away: the row leaves the batch next step
            return
        if seed is not None:
            torch.manual_seed(seed)
        if self.fast is not None and self.fast.fits(input_ids.shape[1] + max_new_tokens):
            yield from self._stream_fast(input_ids, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                         stream_text)
            return
        streamer = _IdStreamer()
        kwargs = self._gen_kwargs(max_new_tokens, temperature, top_p, repetition_penalty, top_k)
        stop = threading.Event()       # set when the consumer goes away (Stop pressed, client disconnected)

        def work():
            with self._lock, torch.no_grad():
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled(stop)]),
                                    **self._prefilled(input_ids), **kwargs)
        yield from self._in_worker(work, streamer, stop, stream_text)

    def _prefilled(self, input_ids: torch.Tensor) -> dict:
        """`generate`'s cache with all but the prompt's last token already read by the model as loaded, when the
        engine decodes with an int8 / int4 copy: torch's int4 kernel reads many prompt rows 1.3-1.4x slower than
        fp32's GEMM (docs/BENCHMARKS.md "Session 14: int4 the CPU default"), as the batcher does it (inference/
        batching.py `prefill_model`); `generate` then reads the last token and decodes with the copy. {} else."""
        if self.loaded_model is self.model or input_ids.shape[1] < 2:
            return {}
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.loaded_model(input_ids=input_ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
        return {"past_key_values": cache}

    def _stream_fast(self, input_ids, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                     stream_text) -> Iterator[str]:
        """The CUDA static-cache decoder, run in the worker thread while it holds the lock, so a consumer
        that pauses or leaves never keeps the model locked: leaving stops the worker after one token. The
        tokens travel through the same `_IdStreamer` queue as the generate path's."""
        streamer = _IdStreamer(skip_prompt=False)    # the decoder hands over new tokens only
        stop = threading.Event()

        def work():
            with self._lock:
                for tid in self.fast.tokens(input_ids, max_new_tokens, self.stop, temperature, top_p, top_k,
                                            repetition_penalty):
                    if stop.is_set():
                        break
                    streamer.queue.put([tid])
        yield from self._in_worker(work, streamer, stop, stream_text)

    def _in_worker(self, work, streamer: _IdStreamer, stop: threading.Event, stream_text) -> Iterator[str]:
        """Run WORK (which feeds STREAMER) in the engine's worker thread and yield the growing reply. A
        consumer that stops early (generator closed) sets STOP, which ends the work within one token, so
        the lock goes to the next user instead of serving max_new_tokens to nobody. WORK's error is
        raised here once the text before it is out."""
        def run():
            try:
                work()
            finally:
                streamer.end()                    # once: generate ends it itself on success

        done = self._worker.submit(run)
        try:
            yield from stream_text(self.tokenizer, streamer.ids())
        finally:
            stop.set()
        done.result()

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
