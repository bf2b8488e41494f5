"""`python -m trainer show-data FILE --model DIR`: see exactly what training sees, and what it learns.

    python -m trainer show-data data/identity.jsonl --model /root/model --n 3
    python -m trainer show-data data/mixed.jsonl --model tiny --start 100 --max-length 256

Each conversation is rendered by the model's own chat template through `inference.chat_format.encode_chat`
(the function training uses), decoded back to text, and the tokens that carry loss (the assistant
answers and their end token) are wrapped in ⟦ ⟧ (and coloured green on a terminal). Everything outside
the brackets is context only. With `--max-length`, the point where training would cut is marked ✂.
Like the course's `xtuner log-dataset --show masked_text`.
"""
from __future__ import annotations

import argparse
import sys

from inference.chat_format import IGNORE_INDEX, encode_chat, with_system
from trainer.commands.check_data import load_tokenizer
from trainer.data.formats import normalize, read_records, validate_messages
from inference.errors import UserError

OPEN, CLOSE, CUT = "⟦", "⟧", "✂"


def spans(ids: list[int], labels: list[int]) -> list[tuple[int, int, bool]]:
    """Runs of consecutive tokens as (start, end, carries_loss)."""
    out: list[tuple[int, int, bool]] = []
    for i, label in enumerate(labels):
        loss = label != IGNORE_INDEX
        if out and out[-1][2] == loss:
            out[-1] = (out[-1][0], i + 1, loss)
        else:
            out.append((i, i + 1, loss))
    return out


def marked_text(tokenizer, ids: list[int], labels: list[int], color: bool = False) -> str:
    """The decoded conversation with loss-bearing spans wrapped in ⟦ ⟧.

    Spans are cut out of the decoded prefixes (decode(ids[:end]) minus decode(ids[:start])), so word
    boundaries come out as the tokenizer writes them rather than as each piece decodes alone."""
    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out, done = [], ""
    for start, end, loss in spans(ids, labels):
        upto = decode(ids[:end])
        piece = upto[len(done):] if upto.startswith(done) else decode(ids[start:end])
        done = upto
        if loss:
            piece = f"{OPEN}{piece}{CLOSE}"
            if color:
                piece = f"\033[32m{piece}\033[0m"
        out.append(piece)
    return "".join(out)


def show(tokenizer, messages: list[dict], max_length: int | None = None, color: bool = False) -> str:
    enc = encode_chat(tokenizer, messages)
    ids, labels = enc["input_ids"], enc["labels"]
    cut = max_length is not None and len(ids) > max_length
    text = marked_text(tokenizer, ids[:max_length] if cut else ids, labels[:max_length] if cut else labels, color)
    if cut:
        text += f"{CUT} (+{len(ids) - max_length} tokens cut by max_length {max_length})"
    loss = sum(t != IGNORE_INDEX for t in (labels[:max_length] if cut else labels))
    return f"{len(ids)} tokens, {loss} carry loss\n{text}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer show-data", description=__doc__.split("\n")[0])
    p.add_argument("file", help="conversation file (.jsonl or .json; OpenAI, Alpaca or ShareGPT)")
    p.add_argument("--model", required=True, help="model dir (or 'tiny') whose chat template renders the data")
    p.add_argument("--n", type=int, default=2, help="how many conversations to show")
    p.add_argument("--start", type=int, default=0, help="index of the first conversation to show")
    p.add_argument("--system-prompt", help="the system prompt training will prepend")
    p.add_argument("--max-length", type=int, help="mark where training would truncate")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.start < 0:
        raise UserError("--n must be >= 1 and --start >= 0")
    records = read_records(args.file)
    chosen = records[args.start: args.start + args.n]
    if not chosen:
        raise UserError(f"{args.file}: --start {args.start} is past the last of {len(records)} records")
    tokenizer = load_tokenizer(args.model)
    color = sys.stdout.isatty()
    print(f"loss-bearing tokens are inside {OPEN} {CLOSE}; everything else is context only")
    for line, raw in chosen:
        rec = normalize(raw, args.file, line)
        validate_messages(rec["messages"], args.file, line)
        body = show(tokenizer, with_system(rec["messages"], args.system_prompt), args.max_length, color)
        print(f"\n=== {args.file}:{line}: {body}")
    return 0
