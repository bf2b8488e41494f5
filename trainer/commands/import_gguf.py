"""`python -m trainer import-gguf FILE.gguf OUT`: any GGUF chat model whose architecture transformers
reads (llama, mistral, qwen2, phi3, gpt2 ...) -> a Hugging Face model dir (inference/gguf_import.py)."""
from __future__ import annotations

import argparse

from inference.gguf_import import import_gguf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer import-gguf",
                                description="Import a GGUF chat model (any architecture transformers reads) "
                                            "as a Hugging Face model dir.")
    p.add_argument("gguf_file")
    p.add_argument("out")
    args = p.parse_args(argv)
    import_gguf(args.gguf_file, args.out)
    return 0
