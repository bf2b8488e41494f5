"""Merge a LoRA adapter into its base model: a standalone model dir anyone can load.

    python -m trainer merge BASE_DIR ADAPTER_DIR OUT_DIR [--dtype auto|bf16|fp16|fp32] [--max-shard-size 2GB]
                            [--device cpu|cuda|auto]

The output holds safetensors weights, the tokenizer with its chat template, `assistant.json` (the
system prompt used in training) and any remote-code `*.py` files of the base, so it chats exactly
like base + adapter. A QLoRA adapter is merged into the full-precision (bf16/fp32) base: merging into
4-bit weights would round the update away, so an already-quantized base dir is refused. Written to a
temporary dir first and moved into place, so a failed merge leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.device import pick
from inference.loader import check_json_files, check_model_dir, read_assistant_file, read_system_prompt, write_assistant_file
from inference.atomic import check_new_dir, new_dir
from inference.errors import UserError


def refuse_quantized(base: Path) -> None:
    quant = json.loads((base / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    if quant:
        kind = quant.get("quant_method", "quantized")
        raise UserError(f"{base}: is a {kind} quantized checkpoint -- merging into quantized weights rounds the "
                        "adapter away; pass the original bf16/fp32 base model dir (QLoRA adapters merge into it)")


def recorded_base(adapter) -> str | None:
    """The base model an adapter says it was trained on: assistant.json `base_model` (made a path on
    this machine), else adapter_config.json `base_model_name_or_path`; None when neither says."""
    adapter = Path(adapter)
    check_json_files(adapter)
    name = read_assistant_file(adapter).get("base_model")
    config = adapter / "adapter_config.json"
    if not name and config.is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return name or None


def _weights_sample(model_dir: Path) -> list:
    """Names, sizes and a few 64 KiB slices of the weight files: enough to tell a copy of a model from
    another model of the same shape, without hashing gigabytes."""
    out = []
    for f in sorted([*model_dir.glob("*.safetensors"), *model_dir.glob("*.bin")]):
        size = f.stat().st_size
        with f.open("rb") as fh:
            for at in (size // 3, 2 * size // 3, max(size - 65536, 0)):
                fh.seek(at)
                out.append((f.name, size, fh.read(65536)))
    return out


def warn_other_base(base: Path, adapter: Path) -> str | None:
    """A warning when the adapter records a base that exists here and is neither BASE nor a copy of it:
    an adapter merged onto another model of the same shape loads fine and answers garbage. A recorded
    path missing on this machine says nothing (the run may have been on another machine)."""
    name = recorded_base(adapter)
    if not name or not (Path(name) / "config.json").is_file():
        return None
    recorded = Path(name)
    if recorded.resolve() == base.resolve() or _weights_sample(recorded) == _weights_sample(base):
        return None
    return (f"warning: {adapter} was trained on {recorded}, but BASE is {base} (other weights) -- on another "
            f"model an adapter answers nonsense: merge onto {recorded} unless BASE is what you meant")


def merge(base, adapter, out, dtype: str = "fp32", device: str = "cpu", max_shard_size: str = "2GB",
          echo=lambda s: None, warn=None) -> Path:
    from peft import PeftModel

    base = check_model_dir(base)
    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no adapter_config.json -- pass the adapter dir (e.g. WORK_DIR/final)")
    check_json_files(adapter)
    check_new_dir(out)
    refuse_quantized(base)
    placement = pick(device, dtype)
    trained = read_assistant_file(adapter)
    if trained.get("bits"):
        echo(f"adapter was trained on the {trained['bits']}-bit base (QLoRA): merging into the "
             f"{str(placement.dtype).replace('torch.', '')} base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=placement.dtype, device_map={"": placement.device})
    try:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise UserError(f"{adapter}: does not fit the base model {base} (tensor size mismatch) -- pass the base "
                        f"it was trained on ({recorded_base(adapter) or 'see adapter_config.json'})") from None
    other = warn_other_base(base, adapter)   # only once it fits: a shape mismatch was said above
    if other:
        (warn or echo)(other)
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else base)
    with new_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        for code in base.glob("*.py"):        # remote-code models need their modeling/tokenizer files
            shutil.copy2(code, tmp / code.name)
        write_assistant_file(tmp, read_system_prompt(adapter, base), base_model=str(base), adapter=str(adapter))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer merge", description=__doc__.split("\n")[0])
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), bf16, fp16 or fp32")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--max-shard-size", default="2GB")
    args = p.parse_args(argv)
    out = merge(args.base, args.adapter, args.out, dtype=args.dtype, device=args.device,
                max_shard_size=args.max_shard_size, echo=print, warn=lambda s: print(s, file=sys.stderr))
    print(f"merged model written to {out}")
    return 0
