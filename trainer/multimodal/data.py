"""LLaVA / ShareGPT image conversations: read and check them, encode them, batch them with pixels.

A record (JSONL line or JSON array item), images relative to an image folder:
    {"id": "0", "image": "images/cat.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}
Checks, each failing with `FILE:LINE: ...`: the conversation itself (roles, alternation, non-empty),
exactly one `<image>` tag in a user turn when the record has an image and none when it has not, the
image file exists and is a readable image. Records without "image" are plain text chats.

Encoding goes through `inference.chat_format.encode_chat` (the tokenizer's own template, loss on
assistant tokens only); the single `<image>` token is then expanded to one placeholder per image
patch feature, the way `LlavaProcessor` expands it, with no loss on them.
"""
from __future__ import annotations

from pathlib import Path

from inference.chat_format import IGNORE_INDEX, encode_chat, with_system
from trainer.data.formats import normalize, read_records, validate_messages
from inference.errors import UserError, where
from inference.llava_model import IMAGE_TOKEN, expand_image_tokens, image_file_problem, open_image


def image_folder_for(data_path, image_folder=None) -> Path:
    """Images are relative to `image_folder`, else to the data file's own folder."""
    return Path(image_folder) if image_folder else Path(data_path).parent


def image_problems(rec: dict, folder, verify: bool = False) -> list[str]:
    """What is wrong with the image side of one normalised record (`{"messages", "image"?}`), without
    the FILE:LINE prefix: tag count and place, the image file. Used by training and check-data."""
    counts = [(m.get("role"), str(m.get("content") or "").count(IMAGE_TOKEN)) for m in rec.get("messages") or []]
    total = sum(n for _, n in counts)
    image = rec.get("image")
    if not image:
        return [f"{total} {IMAGE_TOKEN} tag(s) but no 'image' key -- add the image path or remove the tag"] if total else []
    if not isinstance(image, str):
        return ["'image' must be one relative path string (one image per conversation)"]
    out = []
    if total == 0:
        out.append(f"record has an image but no {IMAGE_TOKEN} tag -- put {IMAGE_TOKEN!r} in the first human "
                   f"turn, e.g. \"{IMAGE_TOKEN}\\nWhat is in the picture?\"")
    elif total > 1:
        out.append(f"{total} {IMAGE_TOKEN} tags for one image -- keep exactly one")
    else:
        role = next(r for r, n in counts if n)
        if role != "user":
            out.append(f"the {IMAGE_TOKEN} tag is in a {role} turn -- it belongs in a human turn")
    problem = image_file_problem(Path(folder) / image, verify)
    return out + ([problem] if problem else [])


def _checked_record(raw, path, line, folder: Path, verify: bool) -> dict:
    """The record as {messages, image, where} -- or a UserError for the first thing wrong with it."""
    rec = normalize(raw, path, line)
    validate_messages(rec["messages"], path, line)
    problems = image_problems(rec, folder, verify)
    if problems:
        raise UserError(f"{where(path, line)}: {problems[0]}")
    image = rec.get("image")
    return {"messages": rec["messages"], "image": str(folder / image) if image else None, "where": where(path, line)}


def read_llava_records(path, image_folder=None, verify: bool = False) -> list[dict]:
    """All records of one file, checked; stops at the first problem (a UserError with FILE:LINE)."""
    folder = image_folder_for(path, image_folder)
    return [_checked_record(raw, path, line, folder, verify) for line, raw in read_records(path)]


def check_llava_file(path, image_folder=None) -> dict:
    """Every record checked, images fully decoded; raises a UserError naming the first bad record (and
    how many more there are), else returns counts."""
    folder = image_folder_for(path, image_folder)
    problems, images = [], 0
    rows = read_records(path)
    for line, raw in rows:
        try:
            rec = _checked_record(raw, path, line, folder, verify=True)
            images += rec["image"] is not None
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 1} more bad record(s) in this file)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    return {"records": len(rows), "with_image": images}


def encode_records(records: list[dict], tokenizer, image_id: int, n_image_tokens: int, max_length: int,
                   system_prompt: str | None) -> tuple[list[dict], dict]:
    """Samples `{input_ids, labels, image, where}` plus counts; a sample whose image placeholders or
    answer would be cut by `max_length` is dropped (a cut image breaks the feature/token match)."""
    samples, stats = [], {"samples": 0, "truncated": 0, "dropped": 0, "images": 0}
    for rec in records:
        enc = encode_chat(tokenizer, with_system(rec["messages"], system_prompt))
        ids, labels = expand_image_tokens(enc["input_ids"], enc["labels"], image_id, n_image_tokens)
        if len(ids) > max_length:
            stats["truncated"] += 1
            ids, labels = ids[:max_length], labels[:max_length]
        want = n_image_tokens if rec["image"] else 0
        if ids.count(image_id) != want or all(t == IGNORE_INDEX for t in labels):
            stats["dropped"] += 1
            continue
        stats["images"] += bool(rec["image"])
        samples.append({"input_ids": ids, "labels": labels, "image": rec["image"], "where": rec["where"]})
    stats["samples"] = len(samples)
    return samples, stats


class LlavaCollator:
    """Pads text like the text engine's Collator and adds `pixel_values` for the samples that have an
    image, in batch order (LLaVA scatters image features into the placeholders in that order)."""

    def __init__(self, pad_id: int, image_processor):
        from trainer.engine.dataset import Collator

        self.text = Collator(pad_id, packed=False)
        self.image_processor = image_processor

    @property
    def tokens_seen(self) -> int:          # read by trainer.engine.callbacks.LogLine for tok/s
        return self.text.tokens_seen

    def __call__(self, batch: list[dict]) -> dict:
        out = self.text([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch])
        images = [open_image(b["image"], b["where"]) for b in batch if b["image"]]
        if images:
            out["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return out


