"""Chat with a model in the terminal, streaming, through the shared inference core.

    python -m trainer chat MODEL_DIR [--adapter DIR] [--system TEXT] [--temperature 0.7]
                                     [--top-p 0.9] [--max-new-tokens 256]

Type a message; an empty line sends it (so messages can span lines). `RESET` clears the history,
`EXIT` quits (so does end of input). Works with piped stdin: `printf '你是谁\n\n' | python -m trainer chat M`.
"""
from __future__ import annotations

import argparse
import sys

from inference import load


def read_message(stream, interactive: bool) -> str | None:
    """Lines until an empty line (or EOF). None at EOF with nothing read."""
    lines = []
    while True:
        if interactive:
            print("> " if not lines else ". ", end="", flush=True)
        line = stream.readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\n")
        if not line.strip():
            if lines:
                return "\n".join(lines)
            continue
        if not lines and line.strip() in ("RESET", "EXIT"):
            return line.strip()
        lines.append(line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer chat", description=__doc__.split("\n")[0])
    p.add_argument("model", help="model dir (merged, or the base when --adapter is given)")
    p.add_argument("--adapter", help="PEFT adapter dir, e.g. WORK_DIR/final")
    p.add_argument("--system", help="system prompt (default: the one saved with the model)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--bits", type=int, choices=[4, 8], help="load 4/8-bit (bitsandbytes)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = p.parse_args(argv)

    loaded = load(args.model, adapter=args.adapter, device=args.device, bits=args.bits)
    engine = loaded.engine()
    interactive = sys.stdin.isatty()
    print(f"[{loaded.note}] empty line sends, RESET clears, EXIT quits", file=sys.stderr)
    history: list[dict] = []
    while True:
        message = read_message(sys.stdin, interactive)
        if message is None or message == "EXIT":
            return 0
        if message == "RESET":
            history = []
            print("[history cleared]", flush=True)
            continue
        history.append({"role": "user", "content": message})
        shown = ""
        for shown_next in engine.stream_chat(history, system_prompt=args.system, max_new_tokens=args.max_new_tokens,
                                             temperature=args.temperature, top_p=args.top_p):
            print(shown_next[len(shown):], end="", flush=True)
            shown = shown_next
        print(flush=True)
        history.append({"role": "assistant", "content": shown})
