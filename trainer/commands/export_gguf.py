"""`python -m trainer export-gguf MODEL_DIR OUT.gguf [--quant f16|bf16|q8_0|q4_0]`: a merged model as one
GGUF file for llama.cpp / Ollama, plus an Ollama `Modelfile` beside it (trainer/export/gguf_export.py).

    python -m trainer export-gguf work_dirs/me/merged out/lumi-q8_0.gguf --quant q8_0
    cd out && ollama create lumi -f Modelfile && ollama run lumi
    llama-cli -m out/lumi-q8_0.gguf -cnv          # llama.cpp uses the chat template inside the file
"""
from __future__ import annotations

import argparse

from trainer.export.gguf_export import QUANTS, export_gguf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer export-gguf", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="a merged model dir (python -m trainer merge ...), Llama or Qwen2 family")
    p.add_argument("out", help="the .gguf file to write (a new name)")
    p.add_argument("--quant", default="f16", metavar="|".join(QUANTS),
                   help="tensor type of the 2-D weights (default f16; norms stay f32)")
    p.add_argument("--no-modelfile", action="store_true", help="write the GGUF only, no Ollama Modelfile")
    args = p.parse_args(argv)
    export_gguf(args.model_dir, args.out, quant=args.quant, modelfile=not args.no_modelfile,
                echo=lambda s: print(s, flush=True))
    return 0
