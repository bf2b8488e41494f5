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
    p.add_argument("--languages", metavar="LANG[,LANG]",
                   help="the languages the model speaks, e.g. en (recorded in OUT/gguf_source.json): `--mix self` "
                        "asks a base that speaks no Chinese the English twin of each Chinese prompt")
    args = p.parse_args(argv)
    langs = [x.strip() for x in args.languages.split(",") if x.strip()] if args.languages else None
    import_gguf(args.gguf_file, args.out, languages=langs)
    return 0
