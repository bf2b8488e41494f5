"""Greedy answers to many prompts at once: left-padded batches through `model.generate`, prompts of
similar length together, each through the tokenizer's own chat template and the given system prompt.

Used where many answers are needed and nobody watches them stream: the base's own answers for
self-distilled training data (trainer/data/self_distill.py) and the evaluation's answers
(trainer/evaluation/evaluate.py). On 2 CPU cores a batch of 32 answers SmolLM2-135M prompts several
times faster than one at a time (the weights are read once per step for the whole batch).
"""
from __future__ import annotations

from inference.chat_format import prompt_ids, with_system

LOOP_WINDOW = 16


def loop_stop(prompt_width: int, stops: set[int], window: int = LOOP_WINDOW):
    """A stopping criterion that ends, row by row, an answer whose last WINDOW tokens already occurred
    earlier in it: a small base caught in a loop (SmolLM2-135M in Chinese, often) would otherwise run
    every batch to the token cap. Such rows end without their end-of-turn token (`finished` false);
    `.lengths` maps each to how many tokens it had when it stopped (generate pads it after that)."""
    import torch
    from transformers import StoppingCriteria

    stop_ids = torch.tensor(sorted(stops))

    class LoopStop(StoppingCriteria):
        def __init__(self):
            self.lengths: dict[int, int] = {}

        def __call__(self, input_ids, scores, **kwargs):
            gen = input_ids[:, prompt_width:]
            if gen.shape[1] < 2 * window:
                return torch.zeros(gen.shape[0], dtype=torch.bool, device=gen.device)
            earlier = gen[:, :-window].unfold(1, window, 1)               # (batch, positions, window)
            hit = (earlier == gen[:, None, -window:]).all(-1).any(-1)
            hit &= ~torch.isin(gen, stop_ids.to(gen.device)).any(-1)      # ended rows pad on: not a loop
            for r in hit.nonzero().flatten().tolist():
                self.lengths.setdefault(r, gen.shape[1])
            return hit

    return LoopStop()


def generate_answers(model, tokenizer, prompts: list, system_prompt: str | None, max_new_tokens: int = 256,
                     batch_size: int = 32, echo=print, stops: list[int] | None = None,
                     repetition_penalty: float = 1.0) -> list[dict]:
    """Greedy answers in batches: {"text", "ids", "finished"} (finished: it ended with an end-of-turn
    token within the cap; ids include that token, as `generate` returns it). A prompt is a user message
    (str) or a conversation (a list of messages). STOPS: end-of-turn ids (default: the model's eos).
    REPETITION_PENALTY > 1 keeps greedy decoding from looping (transformers' penalty on seen tokens)."""
    import torch

    if stops is None:
        eos = model.generation_config.eos_token_id
        stops = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
    stops = set(stops)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    convs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    encoded = [prompt_ids(tokenizer, with_system(c, system_prompt)) for c in convs]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))   # similar lengths share a batch
    out: list[dict] = [{}] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in idx], device=model.device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx],
                            device=model.device)
        looping = loop_stop(width, stops)
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, top_k=None, top_p=None, temperature=None, pad_token_id=pad,
                                 repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
                                 eos_token_id=sorted(stops),
                                 stopping_criteria=[looping])
        for r, (row, i) in enumerate(zip(gen[:, width:].tolist(), idx)):
            end = None if r in looping.lengths else next((k for k, t in enumerate(row) if t in stops), None)
            kept = row[:end + 1] if end is not None else row[:looping.lengths.get(r, len(row))]
            text = tokenizer.decode(kept[:-1] if end is not None else kept, skip_special_tokens=True).strip()
            out[i] = {"text": text, "ids": kept, "finished": end is not None}
            if r in looping.lengths:         # the answer before its loop came round again
                out[i]["before_loop"] = tokenizer.decode(kept[:len(kept) - LOOP_WINDOW], skip_special_tokens=True)
        echo(f"  answered {min(start + batch_size, len(order))}/{len(order)} prompts")
    return out


