"""Load a chat model for generation: a model dir, optionally a LoRA adapter on top, on the best device.

    loaded = load("merged/")                          # CUDA bf16/fp16 if present, else CPU fp32
    loaded = load("base/", adapter="work/final")      # base + PEFT adapter
    loaded = load("big/", bits=4)                     # 4-bit through bitsandbytes (CUDA or CPU)

The system prompt used in training travels in `assistant.json` next to the weights (adapter dir
first, then model dir) and becomes the engine's default.
"""
from __future__ import annotations

import json

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.assistant_file import (ASSISTANT_FILE, read_assistant_file, read_system_prompt,  # noqa: F401
                                     write_assistant_file)
from inference.device import Placement, fit_gpu, pick
from inference.engine import ChatEngine
from inference.errors import UserError
from inference.repo_files import lfs_pointers

log = logging.getLogger("own_assistant.loader")


@dataclass
class Loaded:
    model: object
    tokenizer: object
    placement: Placement
    system_prompt: str | None
    note: str                     # one line for logs and UIs: what runs where

    def engine(self, fast_decode: bool | str = "auto", cpu_decode: str = "auto", **kwargs) -> ChatEngine:
        # max_batch=SERVING_BATCH (inference/engine.py) for front ends that serve several users at once
        """The chat engine every front end uses. fast_decode "auto": on a CUDA GPU with unquantized
        weights, the compiled CUDA-graph decode (inference/fast_decode.py: 416 vs 58 tokens/s for a 1.8B
        model on an H200, docs/BENCHMARKS.md); `generate` on CPU and for 4/8-bit models. The
        FAST_DECODE environment variable (off | graph | compile | tuned) overrides "auto". cpu_decode "auto":
        for a model on the CPU in fp32, the CPU_DECODE environment variable (fp32 | int8 | int4,
        inference/cpu_decode.py), and unset int4 for a causal LM of AUTO_INT4_PARAMS or more (fp32 for smaller
        ones and for adapters left unmerged); fp32 elsewhere. On the CPU the serving batcher compiles its decode
        step for an int8 / int4 copy (inference/row_step.py); FAST_DECODE=off keeps it eager there too."""
        if fast_decode == "auto":
            if fast_off() and getattr(getattr(self.model, "device", None), "type", "cpu") == "cpu":
                kwargs.setdefault("batch_decoder", "dynamic")
            fast_decode = auto_fast_decode(self.model)
        if cpu_decode == "auto":
            cpu_decode = auto_cpu_decode(self.model)
        return ChatEngine(self.model, self.tokenizer, system_prompt=self.system_prompt, fast_decode=fast_decode,
                          cpu_decode=cpu_decode, **kwargs)


# CPU_DECODE unset: int4 from this size on. The embedded base (135M) serves 2.0x faster in int4 with the
# held-out scores of fp32 (docs/BENCHMARKS.md "Session 14: int4 the CPU default"); the tiny test bases stay fp32.
AUTO_INT4_PARAMS = 50 * 10**6


def fast_off() -> bool:
    return os.environ.get("FAST_DECODE", "").strip().lower() in ("off", "0", "false", "no")


def auto_fast_decode(model) -> bool | str:
    choice = os.environ.get("FAST_DECODE", "").strip().lower()
    if fast_off():
        return False
    if choice in ("graph", "compile", "tuned"):
        return choice
    on_gpu = getattr(getattr(model, "device", None), "type", "cpu") == "cuda"
    return on_gpu and not getattr(model, "is_quantized", False)


def auto_cpu_decode(model) -> str:
    """CPU_DECODE (fp32 | int8 | int4) for an unquantized fp32 model on the CPU; fp32 elsewhere. Unset: int4 for
    a plain causal LM big enough to be bound by reading its weights (inference/cpu_decode.py `default_choice`),
    else fp32. A value that is none of these is an error, not ignored."""
    from inference.cpu_decode import CHOICES, default_choice

    choice = os.environ.get("CPU_DECODE", "").strip().lower()
    if choice and choice not in CHOICES:
        raise UserError(f"CPU_DECODE={choice!r}: expected one of {', '.join(CHOICES)} (or unset: int4 for a "
                        f"causal LM of {AUTO_INT4_PARAMS // 10**6}M+ parameters, else fp32)")
    on_cpu = getattr(getattr(model, "device", None), "type", "cpu") == "cpu"
    plain = not getattr(model, "is_quantized", False) and getattr(model, "dtype", None) == torch.float32
    if not (on_cpu and plain):
        return "fp32"
    return choice or default_choice(model, AUTO_INT4_PARAMS)


JSON_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json", "generation_config.json",
              "assistant.json")


def check_json_files(folder) -> None:
    """Each JSON file a model or adapter dir holds parses: a corrupt one is a line naming it, not a
    traceback from deep inside transformers or PEFT."""
    for name in JSON_FILES:
        file = Path(folder) / name
        if file.is_file():
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise UserError(f"{file}: not valid JSON ({exc}) -- restore it from the run or the repo it "
                                f"came from") from None


def check_model_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json -- not a Hugging Face model directory")
    check_json_files(path)
    stubs = lfs_pointers(path)
    if stubs:
        raise UserError(f"{stubs[0]}: is a git-lfs pointer, not the real file -- run `git lfs pull` in {path}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{path}: no weights (*.safetensors or *.bin)")
    return path


def param_count(model_dir) -> int:
    """Parameters in the weights, from the safetensors headers (no tensor is read); else file sizes / 2."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return sum(p.stat().st_size for p in Path(model_dir).glob("*.bin")) // 2
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    return total


def quantization_config(bits: int | None, compute_dtype: torch.dtype):
    if not bits:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if compute_dtype == torch.float32 else compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"bits {bits}: use 4, 8 or none")


def load(model_dir, adapter=None, device: str = "auto", dtype: str = "auto", bits: int | None = None) -> Loaded:
    path = check_model_dir(model_dir)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no adapter_config.json -- not a PEFT adapter directory")
    if adapter is not None:
        check_json_files(adapter)
    placement = pick(device, dtype)
    why = ""
    if device == "auto" and bits is None:        # serving on whatever GPU there is: fall back, don't OOM
        placement, bits, why = fit_gpu(param_count(path), placement)
        if why:
            log.warning("%s: %s", path, why)
    tokenizer = AutoTokenizer.from_pretrained(adapter or path)
    if not tokenizer.chat_template:
        raise UserError(f"{adapter or path}: tokenizer has no chat template -- this is not a chat model")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=placement.dtype, device_map={"": placement.device},
        quantization_config=quantization_config(bits, placement.dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    what = f"{path.name}" + (f" + adapter {Path(adapter).name}" if adapter else "") + (f", {bits}-bit" if bits else "")
    return Loaded(model, tokenizer, placement, read_system_prompt(adapter, path),
                  note=f"{what} on {placement.describe()}" + (f" ({why})" if why else ""))
