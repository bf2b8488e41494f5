"""`python -m trainer check-data FILE`: find everything wrong with a conversation file before training.

    python -m trainer check-data data/identity.jsonl
    python -m trainer check-data data/mixed.jsonl --model /root/model --max-length 512
    python -m trainer check-data llava.json --image-folder imgs/ --model LLM_DIR --visual-encoder CLIP_DIR --max-length 2048

Checks every record (OpenAI messages as JSONL or a JSON array, Alpaca, ShareGPT): valid JSON, a known
format, roles valid and alternating (an optional system message first), no empty turn, an assistant
answer at the end, no unfilled placeholder (`{{NAME}}`, `{name}`, `<NAME>`). With `--model`, each
conversation is rendered by that model's tokenizer and chat template (exactly as training does) and
counted against `--max-length` (default: the training default): longer ones would be truncated, and
lose part or all of their last answer. LLaVA image records count each `<image>` as the vision tokens
the model inserts for it ((image_size / patch_size)^2: 576 for CLIP ViT-L/14-336), read from `--model`
when it is a LLaVA dir, else from `--visual-encoder CLIP_DIR`; an image cut by max_length drops the
record in training. Every problem is printed as `FILE:LINE: what is wrong` (up to
`--max-errors`), then a summary; the exit code is 2 when there is any problem, else 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from inference.chat_format import IGNORE_INDEX, encode_chat, with_system
from trainer.engine.config import TrainConfig
from trainer.data.formats import scan
from inference.errors import UserError
from inference.llava_model import expand_image_tokens
from trainer.multimodal.data import image_folder_for, image_problems


def load_tokenizer(model: str):
    """The tokenizer (with its chat template) of a model dir or an embedded base ("tiny", "smollm2")."""
    from transformers import AutoTokenizer

    from trainer.bases.registry import resolve_model

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise UserError(f"{path}: tokenizer has no chat template -- use a chat model")
    return tokenizer


def length_problem(tokenizer, messages: list[dict], max_length: int, image: tuple[int, int] | None = None
                   ) -> tuple[int, str | None]:
    """(token count, what truncation to `max_length` does to the answers, or None if none is cut).

    `image` = (image token id, vision tokens per image): each `<image>` is expanded as training expands
    it (trainer/multimodal/data.py), and a cut image drops the record as training does.
    Only lost answer tokens are a problem: cutting the template's trailing newline changes nothing."""
    enc = encode_chat(tokenizer, messages)
    ids, labels = enc["input_ids"], enc["labels"]
    if image is not None:
        ids, labels = expand_image_tokens(ids, labels, *image)
    n = len(ids)
    total = sum(t != IGNORE_INDEX for t in labels)
    kept = sum(t != IGNORE_INDEX for t in labels[:max_length])
    image_cut = image is not None and ids[:max_length].count(image[0]) != ids.count(image[0])
    if kept == total and not image_cut:
        return n, None
    if image_cut:
        fate = f"the image's {image[1]} vision tokens are cut, training drops it"
    elif kept == 0:
        fate = "the whole answer is cut, training drops it"
    else:
        fate = f"{total - kept} of {total} answer tokens are cut"
    return n, f"{n} tokens > max_length {max_length}: {fate} -- shorten it or raise max_length"


def image_counting(tokenizer, model: str | None, visual_encoder: str | None, file) -> tuple[int, int]:
    """(image token id, vision tokens per image) for LLaVA records, with `<image>` made one token of
    `tokenizer` as the LLaVA processor makes it; a UserError when nothing says how many tokens."""
    from inference.llava_model import add_image_token, vision_token_count
    n = vision_token_count(model, visual_encoder)
    if n is None:
        raise UserError(f"{file}: records with images: pass --visual-encoder CLIP_DIR (or --model a LLaVA dir) "
                        f"so each image counts as the vision tokens the model inserts, not as 1 token")
    return add_image_token(tokenizer), n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer check-data", description=__doc__.split("\n")[0])
    p.add_argument("file", help="conversation file (.jsonl or .json)")
    p.add_argument("--model", help="model dir (or 'tiny') whose tokenizer and chat template count tokens")
    p.add_argument("--max-length", type=int, help=f"token limit per conversation (default {TrainConfig.max_length},"
                   f" the training default); needs --model")
    p.add_argument("--system-prompt", help="the system prompt training will prepend (counts toward length)")
    p.add_argument("--max-errors", type=int, default=50, help="print at most this many problems")
    p.add_argument("--image-folder", help="LLaVA records: image paths are relative to this (default: the file's folder)")
    p.add_argument("--visual-encoder", help="LLaVA records: the CLIP dir (or 'tiny') whose patches set the tokens per "
                   "image, when --model is the LLM")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_length is not None and not args.model:
        raise UserError("--max-length needs --model DIR: lengths are counted in that model's tokens")
    max_length = args.max_length or TrainConfig.max_length
    if max_length < 1:
        raise UserError("--max-length must be >= 1")
    rows = scan(args.file)
    if not rows:
        raise UserError(f"{args.file}: no records -- the file is empty")
    if args.visual_encoder and not args.model:
        raise UserError("--visual-encoder needs --model DIR: it sets how many tokens an image takes in that model")
    tokenizer = load_tokenizer(args.model) if args.model else None
    image = None                  # (image token id, vision tokens per image), once a record has an image

    problems: list[tuple[int, str]] = []
    lengths, over, truncated, seen, duplicates = [], 0, 0, set(), 0
    for line, rec, found in rows:
        if rec is not None:       # LLaVA image records: <image> tags, image files (trainer/multimodal/data.py)
            found = found + image_problems(rec, image_folder_for(args.file, args.image_folder), verify=True)
        problems += [(line, p) for p in found]
        if rec is None or found:
            continue
        key = json.dumps(rec["messages"], ensure_ascii=False, sort_keys=True)
        duplicates += key in seen
        seen.add(key)
        if tokenizer is not None:
            if rec.get("image") and image is None:
                image = image_counting(tokenizer, args.model, args.visual_encoder, args.file)
            n, too_long = length_problem(tokenizer, with_system(rec["messages"], args.system_prompt), max_length,
                                         image if rec.get("image") else None)
            lengths.append(n)
            over += n > max_length
            if too_long:
                truncated += 1
                problems.append((line, too_long))

    for line, problem in problems[: args.max_errors]:
        print(f"{args.file}:{line}: {problem}", file=sys.stderr)
    if len(problems) > args.max_errors:
        print(f"... and {len(problems) - args.max_errors} more problems (raise --max-errors to see them)",
              file=sys.stderr)
    bad_lines = len({line for line, _ in problems})
    print(f"{args.file}: {len(rows)} records, {len(rows) - bad_lines} fine, {len(problems)} problems on "
          f"{bad_lines} lines; {duplicates} exact duplicates")
    if lengths:
        print(f"tokens per conversation: min {min(lengths)}, median {int(statistics.median(lengths))}, "
              f"max {max(lengths)}; {over} over max_length {max_length}, {truncated} of them lose answer tokens"
              + (f" or their image (each image counted as {image[1]} vision tokens)" if image else ""))
    else:
        print("token lengths not checked (pass --model DIR to count them with its chat template)"
              if tokenizer is None else "token lengths: no valid conversation to count")
    return 2 if problems else 0
