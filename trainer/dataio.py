"""Read conversation files in any common format; write JSONL atomically.

Accepted inputs, one record per JSONL line or a JSON array:
* OpenAI: `{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}`
* Alpaca: `{"instruction", "input"?, "output", "system"?}`
* ShareGPT / LLaVA: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "image"?}`
All become OpenAI messages. Errors name the file and line: `data.jsonl:7: ...`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from trainer.errors import UserError, where

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}


def normalize(record, path, line) -> dict:
    """One record in any supported format -> `{"messages": [...]}` (other keys kept)."""
    if not isinstance(record, dict):
        raise UserError(f"{where(path, line)}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise UserError(f"{where(path, line)}: 'messages' must be a list of {{role, content}} objects")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    elif "conversations" in record:
        messages = []
        for turn in record["conversations"]:
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise UserError(f"{where(path, line)}: unknown ShareGPT speaker {turn.get('from')!r} "
                                f"(use human/gpt/system)")
            messages.append({"role": role, "content": turn.get("value")})
    elif "instruction" in record and "output" in record:
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n{record['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise UserError(f"{where(path, line)}: no 'messages', 'conversations' or 'instruction'/'output' "
                        f"keys -- not OpenAI, ShareGPT or Alpaca format")
    rest = {k: v for k, v in record.items() if k not in ("messages", "conversations", "instruction",
                                                          "input", "output", "system")}
    return {"messages": messages, **rest}


def validate_messages(messages, path, line) -> None:
    """Roles valid and alternating, contents non-empty strings, ends with an assistant turn."""
    if not messages:
        raise UserError(f"{where(path, line)}: empty conversation")
    expected = "user"
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role == "system":
            if i != 0:
                raise UserError(f"{where(path, line)}: a system message may only come first (turn {i + 1})")
            continue
        if role not in ("user", "assistant"):
            raise UserError(f"{where(path, line)}: invalid role {role!r} in turn {i + 1} "
                            f"(use system, user or assistant)")
        if role != expected:
            raise UserError(f"{where(path, line)}: turn {i + 1} is {role!r} but {expected!r} was expected "
                            f"(user and assistant must alternate)")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where(path, line)}: empty {role} message in turn {i + 1}")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where(path, line)}: conversation does not end with an assistant answer")


def read_records(path) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for a .jsonl file or a JSON array file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where(path, exc.lineno)}: invalid JSON ({exc.msg})") from None
        return [(i + 1, item) for i, item in enumerate(items)]
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            out.append((n, json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{where(path, n)}: invalid JSON ({exc.msg}) -- one JSON object per line") from None
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
