"""Read conversation files in any common format; write JSONL atomically.

Accepted inputs, one record per JSONL line or a JSON array:
* OpenAI: `{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}`
* Alpaca: `{"instruction", "input"?, "output", "system"?}`
* ShareGPT / LLaVA: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "image"?}`
All become OpenAI messages. Errors name the file and line: `data.jsonl:7: ...` (in a JSON array, the
line where the record starts). `scan` reports every problem of a file instead of stopping at the first
(used by `python -m trainer check-data`); `load_conversations` stops at the first.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from inference.atomic import new_file
from inference.errors import UserError, where

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}

# Template slots left unfilled, as shipped by identity datasets of LLaMA-Factory (`{{name}}`),
# ms-swift (`{{NAME}}`) and hand-written generators (`{name}`, `<NAME>`): a model trained on them says
# "I am {{NAME}}". Any `{{word}}` counts; single braces and <...> only for identity-like words, so
# code samples such as `f"{x}"` stay valid.
_SLOT = r"(?:name|author|model|model_name|assistant|assistant_name|bot|bot_name|creator|developer|company|org)"
PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}|\{\s*" + _SLOT + r"\s*\}|<\s*(?:NAME|AUTHOR|MODEL)\s*>",
                         re.IGNORECASE)


def find_placeholder(text) -> str | None:
    """The first unfilled template slot in `text`, or None."""
    m = PLACEHOLDER.search(text) if isinstance(text, str) else None
    return m.group(0) if m else None


def normalize(record, path, line) -> dict:
    """One record in any supported format -> `{"messages": [...]}` (other keys kept).

    Alpaca `history` ([[question, answer], ...], as LLaMA-Factory writes it) becomes earlier turns; a
    top-level `system` string (Alpaca, LLaMA-Factory ShareGPT) becomes the system message."""
    at = where(path, line)
    if not isinstance(record, dict):
        raise UserError(f"{at}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise UserError(f"{at}: 'messages' must be a list of {{role, content}} objects")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise UserError(f"{at}: 'conversations' must be a list of {{from, value}} objects")
        messages = []
        for turn in turns:
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise UserError(f"{at}: unknown ShareGPT speaker {turn.get('from')!r} (use human/gpt/system)")
            messages.append({"role": role, "content": turn.get("value")})
    elif "instruction" in record and "output" in record:
        if not all(isinstance(record.get(k, ""), str) for k in ("instruction", "input", "output")):
            raise UserError(f"{at}: Alpaca 'instruction', 'input' and 'output' must be strings")
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n{record['input']}"
        history = record.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise UserError(f"{at}: Alpaca 'history' must be a list of [question, answer] pairs")
        messages = [{"role": role, "content": text} for q, a in history
                    for role, text in (("user", q), ("assistant", a))]
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise UserError(f"{at}: no 'messages', 'conversations' or 'instruction'/'output' "
                        f"keys -- not OpenAI, ShareGPT or Alpaca format")
    system = record.get("system") if "messages" not in record else None
    if system and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system})
    rest = {k: v for k, v in record.items() if k not in ("messages", "conversations", "instruction",
                                                          "input", "output", "system", "history")}
    return {"messages": messages, **rest}


def message_problems(messages) -> list[str]:
    """Everything wrong with one conversation (no file prefix): roles valid and alternating, contents
    non-empty strings, ends with an assistant turn."""
    if not messages:
        return ["empty conversation"]
    problems = []
    expected = "user"
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role == "system":
            if i != 0:
                problems.append(f"a system message may only come first (turn {i + 1})")
            continue
        if role not in ("user", "assistant"):
            problems.append(f"invalid role {role!r} in turn {i + 1} (use system, user or assistant)")
            break      # the alternation of what follows cannot be judged
        if role != expected:
            problems.append(f"turn {i + 1} is {role!r} but {expected!r} was expected "
                            f"(user and assistant must alternate)")
        if not isinstance(content, str):
            problems.append(f"{role} message in turn {i + 1} is {type(content).__name__}, not text")
        elif not content.strip():
            problems.append(f"empty {role} message in turn {i + 1}")
        expected = "assistant" if role == "user" else "user"
    if messages[-1].get("role") != "assistant" and not problems:
        problems.append("conversation does not end with an assistant answer")
    return problems


def validate_messages(messages, path, line) -> None:
    """Raise the first of `message_problems` as `FILE:LINE: ...`."""
    problems = message_problems(messages)
    if problems:
        raise UserError(f"{where(path, line)}: {problems[0]}")


def _array_items(text: str) -> list[tuple[int, object]]:
    """(line where it starts, item) for a JSON array, so errors point at the record's real line."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    items = []
    if text[pos:pos + 1] == "]":
        return items
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise json.JSONDecodeError(exc.msg, text, exc.pos) from None
        items.append((text.count("\n", 0, pos) + 1, item))
        pos = ws.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = ws.match(text, pos + 1).end()
        elif text[pos:pos + 1] == "]" and not text[pos + 1:].strip():
            return items
        else:
            raise json.JSONDecodeError("expected ',' or ']' after an array item", text, pos)


def iter_records(path):
    """Yield `(line, record, error)` for every record of a .jsonl file or a JSON array file; `error`
    is a one-line message (and `record` None) where a line is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text.lstrip().startswith("["):
        try:
            items = _array_items(text)
        except json.JSONDecodeError as exc:
            yield exc.lineno, None, f"invalid JSON ({exc.msg}, column {exc.colno})"
            return
        for line, item in items:
            yield line, item, None
        return
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw), None
        except json.JSONDecodeError as exc:
            yield n, None, f"invalid JSON ({exc.msg}, column {exc.colno}) -- one JSON object per line"


def scan(path) -> list[tuple[int, dict | None, list[str]]]:
    """Every record as `(line, normalised record or None, problems)`: unparsable JSON, unknown format,
    bad roles, empty turns and unfilled placeholders are all collected, none raised."""
    out = []
    for line, record, error in iter_records(path):
        if error:
            out.append((line, None, [error]))
            continue
        try:
            rec = normalize(record, path, line)
        except UserError as exc:
            out.append((line, None, [str(exc).split(": ", 1)[-1]]))
            continue
        problems = message_problems(rec["messages"])
        for i, m in enumerate(rec["messages"]):
            slot = find_placeholder(m.get("content"))
            if slot:
                problems.append(f"unfilled placeholder {slot!r} in the {m.get('role')} message of turn {i + 1} "
                                f"-- replace it with the real name/author")
        out.append((line, rec, problems))
    return out


def read_records(path) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for a .jsonl file or a JSON array file; stops at the first bad line."""
    out = []
    for line, record, error in iter_records(path):
        if error:
            raise UserError(f"{where(path, line)}: {error}")
        out.append((line, record))
    if not out:
        raise UserError(f"{path}: no records")
    return out


def load_conversations(path, validate: bool = True) -> list[dict]:
    out = []
    for line, record in read_records(path):
        rec = normalize(record, path, line)
        if validate:
            validate_messages(rec["messages"], path, line)
        out.append(rec)
    return out


def write_jsonl(path, records) -> None:
    """Write atomically: a crash never leaves a half-written data file behind."""
    with new_file(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
