"""`python -m trainer COMMAND ...`: every step of making your own assistant.

    base               write an embedded base as a model dir: smollm2 (a real chat model), tiny; --list
    import-gguf        any GGUF chat model transformers can read -> a Hugging Face model dir
    tiny               build the tiny offline base chat model
    data               identity conversations (held-out split, general-chat mixing, any input format)
    self-answers       (re)make the bundled file of a base's own answers to the bundled prompts (--mix self)
    check-data         every problem in a data file as FILE:LINE (exit 2 if any)
    show-data          the rendered chat text, loss-bearing tokens marked
    list-cfg/copy-cfg  the shipped presets (like xtuner list-cfg / copy-cfg)
    train              fine-tune (LoRA / QLoRA / full) from a preset or YAML; --resume; --gpus N
    eval               identity / leakage / retention scores of a model or every checkpoint; best/
    convert            a checkpoint -> a clean adapter dir (like xtuner convert pth_to_hf)
    merge              an adapter + its base -> a full model dir
    export-gguf        a merged model -> one GGUF file (f16/bf16/q8_0/q4_0) + an Ollama Modelfile
    convert-internlm2  InternLM2 (remote code) -> the native Llama layout
    chat               chat in the terminal (streaming; RESET clears, EXIT quits; --image for LLaVA)
    repeat, mm-*       LLaVA-style multimodal: data, build, train, export, demo (trainer/multimodal/)
    demo               the main job: tiny base -> data -> train -> merge -> serve the app

Each command is a module with `main(argv) -> int`; `python -m trainer COMMAND -h` shows its flags.
Ctrl-C (exit 130) and SIGTERM (`kill`, a job scheduler, torchrun stopping its workers; exit 143) both
stop a command through its cleanup, so no half-written output or temp dir is left behind.
"""
from __future__ import annotations

import importlib
import signal
import sys
import threading
import warnings

from inference.errors import run_cli

COMMANDS = {
    "base": "trainer.commands.base",
    "import-gguf": "trainer.commands.import_gguf",
    "tiny": "trainer.bases.tiny",
    "data": "trainer.commands.data",
    "self-answers": "trainer.commands.self_answers",
    "check-data": "trainer.commands.check_data",
    "show-data": "trainer.commands.show_data",
    "list-cfg": "trainer.commands.list_cfg",
    "copy-cfg": "trainer.commands.copy_cfg",
    "train": "trainer.commands.train",
    "merge": "trainer.export.merge",
    "export-gguf": "trainer.commands.export_gguf",
    "eval": "trainer.commands.eval",
    "convert": "trainer.export.convert",
    "convert-internlm2": "trainer.export.internlm2",
    "chat": "trainer.commands.chat",
    "repeat": "trainer.multimodal.repeat",        # LLaVA-style multimodal: trainer/multimodal/
    "mm-shapes": "trainer.multimodal.synthetic",
    "mm-build": "trainer.multimodal.model",
    "mm-train": "trainer.multimodal.train",
    "mm-export": "trainer.multimodal.export",
    "mm-demo": "trainer.multimodal.demo",
    "demo": "trainer.commands.demo",
}


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt (not an Exception, so no `except Exception` swallows it):
    `finally` blocks and context managers (inference.atomic, temp dirs) clean up on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated


def run_until_signal(fn, argv) -> int:
    """`run_cli(fn, argv)`, with SIGTERM turned into `Terminated` (one line, exit 143 = 128 + 15).
    Python's default for SIGTERM is to die on the spot, skipping every cleanup."""
    if threading.current_thread() is not threading.main_thread():
        return run_cli(fn, argv)                  # only the main thread may set handlers (and receives them)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run_cli(fn, argv)
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)   # main() may be called in-process (tests)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r} -- one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()      # per-shard "Loading weights" bars drown the useful lines
    # transformers 5 deprecated the `is_gradient_checkpointing` property, and peft (get_peft_model,
    # PeftModel) still reads it, so train / merge / eval / chat each ended with this FutureWarning
    # that nothing here can act on
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    module = importlib.import_module(COMMANDS[name])
    return run_until_signal(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
