"""The one prompt format: the tokenizer's own chat template, rendered to ids plus a loss mask.

Training, sample chats, evaluation and serving all go through `tokenizer.apply_chat_template`, so
the format can never differ between them. `encode_chat` returns `input_ids` and `labels` where only
assistant tokens (content and the closing `<|im_end|>`) carry loss:

* templates with `{% generation %}` markers (ours, and TRL-style ones) give the mask directly;
* other templates (Qwen, Llama 3 ...) are masked by rendering each prefix of the conversation and
  taking the tokens each assistant turn adds -- the template itself still decides every token.
"""
from __future__ import annotations

from pathlib import Path

TEMPLATE_PATH = Path(__file__).parent / "templates" / "chatml.jinja"
IGNORE_INDEX = -100


def chatml_template() -> str:
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend the default system prompt when the conversation has none."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def has_generation_markers(tokenizer) -> bool:
    return "{% generation %}" in (tokenizer.chat_template or "") or "generation -%}" in (
        tokenizer.chat_template or ""
    )


def _ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    )


def encode_chat(tokenizer, messages: list[dict], max_length: int | None = None) -> dict:
    """Token ids and labels (-100 outside assistant turns) for one conversation."""
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
    else:
        ids = _ids(tokenizer, messages)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(_ids(tokenizer, messages[:i], add_generation_prompt=True))
            end = len(_ids(tokenizer, messages[: i + 1]))
            for j in range(start, min(end, len(ids))):
                mask[j] = 1
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of the conversation so far plus the assistant header, ready for `generate`."""
    return _ids(tokenizer, messages, add_generation_prompt=True)
