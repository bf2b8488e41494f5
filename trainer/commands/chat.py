"""Chat with a model in the terminal, streaming, through the shared inference core.

    python -m trainer chat MODEL_DIR [--adapter DIR] [--system TEXT] [--temperature 0.7]
                                     [--top-p 0.9] [--max-new-tokens 256]
    python -m trainer chat LLAVA_DIR --image photo.jpg         # see inference/image_chat.py

Type a message; an empty line sends it (so messages can span lines). `RESET` clears the history,
`EXIT` quits (so does end of input). Works with piped stdin: `printf '你是谁\n\n' | python -m trainer chat M`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from inference import load
from inference.errors import UserError


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


def refuse_adapter_as_model(model) -> None:
    """MODEL given a LoRA adapter (WORK_DIR/final) instead of a model: name the command that works,
    with the base the adapter recorded, rather than the loader's "no config.json"."""
    from trainer.export.merge import recorded_base
    from inference.llava_model import LLAVA_FILE
    path = Path(model)
    if (path / "config.json").is_file() or not (path / "adapter_config.json").is_file():
        return
    if (path / LLAVA_FILE).is_file():      # an mm-train dir: it goes on MODEL as --llava, not --adapter
        return
    base = recorded_base(path)
    if base and Path(base).is_absolute() and Path(base).resolve().is_relative_to(Path.cwd().resolve()):
        base = str(Path(base).resolve().relative_to(Path.cwd().resolve()))    # as the user typed it, mostly
    shown = shlex.quote(base) if base else "BASE"
    adapter = shlex.quote(str(path))
    where = f" (trained on {base})" if base else ""
    raise UserError(f"{path}: is a LoRA adapter{where}, not a model -- chat with it on its base: "
                    f"`python -m trainer chat {shown} --adapter {adapter}`, or merge it first: "
                    f"`python -m trainer merge {shown} {adapter} OUT_DIR`")


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
    p.add_argument("--image", help="chat about this image (MODEL: a LLaVA dir, or an LLM with --visual-encoder)")
    p.add_argument("--visual-encoder", help="CLIP dir: with --llava, MODEL is the LLM the LLaVA was built on")
    p.add_argument("--llava", help="trained LLaVA dir (mm-train final/, checkpoint, mm-export) to put on MODEL")
    args = p.parse_args(argv)

    if args.image or args.llava or args.visual_encoder:     # multimodal: inference/image_chat.py
        from inference.image_chat import load_llava
        loaded = load_llava(args.model, args.image, args.llava, args.visual_encoder, args.adapter, args.device,
                            bits=args.bits)
    else:
        refuse_adapter_as_model(args.model)
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
