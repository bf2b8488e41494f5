"""Turn a training checkpoint into a clean, shippable adapter dir (XTuner's `convert pth_to_hf` step).

    python -m trainer convert WORK_DIR/checkpoint-300 OUT_DIR
    python -m trainer convert WORK_DIR OUT_DIR          # the newest complete checkpoint of a run

OUT_DIR gets only what a user of the adapter needs: `adapter_config.json` (pointing at the base
model), `adapter_model.safetensors`, the tokenizer with its chat template, and `assistant.json` with
the system prompt used in training -- no optimizer, scheduler, RNG or trainer state. Plain
`PeftModel.from_pretrained(base, OUT_DIR)` loads it. A full fine-tuning checkpoint becomes a clean
model dir the same way. Written to a temporary dir and renamed, so nothing is ever half-written.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from inference.loader import ASSISTANT_FILE, read_assistant_file, write_assistant_file
from trainer.engine import checkpoints
from inference.atomic import check_new_dir, new_dir
from inference.errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def pick_checkpoint(src: Path) -> Path:
    """A checkpoint/adapter dir as given, or the newest complete checkpoint of a work dir."""
    if not src.is_dir():
        raise UserError(f"{src}: directory not found")
    if (src / checkpoints.MARKER).is_file() and checkpoints.read_marker(src) is None:
        raise UserError(f"{src}: incomplete checkpoint (a file is missing or truncated; killed while saving?) "
                        "-- convert an earlier one")
    if (src / "adapter_config.json").is_file() or (src / "config.json").is_file():
        return src
    done = checkpoints.complete_checkpoints(src)
    if not done:
        raise UserError(f"{src}: not a checkpoint (no adapter_config.json / config.json) and no complete "
                        "checkpoint-N/ inside -- pass WORK_DIR/checkpoint-N")
    return done[-1]


def training_facts(ckpt: Path) -> dict:
    """What the run that wrote the checkpoint recorded: system_prompt, base_model, method, bits."""
    facts: dict = {"system_prompt": None, "base_model": None}
    if (ckpt / ASSISTANT_FILE).is_file():
        facts.update(read_assistant_file(ckpt))
    elif (ckpt.parent / "config.yaml").is_file():           # the run's own config, next to its checkpoints
        run = yaml.safe_load((ckpt.parent / "config.yaml").read_text(encoding="utf-8")) or {}
        facts.update({k: run.get(k) for k in ("system_prompt", "method", "bits")})
    marker = checkpoints.read_marker(ckpt)
    if marker:
        facts["base_model"] = marker.get("base_model")
    if facts["base_model"] is None and (ckpt / "adapter_config.json").is_file():
        config = json.loads((ckpt / "adapter_config.json").read_text(encoding="utf-8"))
        facts["base_model"] = config.get("base_model_name_or_path")
    return facts


def convert(src, out) -> Path:
    src, out = Path(src), Path(out)
    check_new_dir(out)
    ckpt = pick_checkpoint(src)
    is_adapter = (ckpt / "adapter_config.json").is_file()
    weights = ADAPTER_FILES if is_adapter else MODEL_FILES
    if is_adapter and not (ckpt / "adapter_model.safetensors").is_file():
        raise UserError(f"{ckpt}: adapter_config.json but no adapter_model.safetensors -- not a complete adapter")
    if not is_adapter and not any(ckpt.glob("model*.safetensors")):
        raise UserError(f"{ckpt}: no model*.safetensors weights")
    facts = training_facts(ckpt)
    base = facts["base_model"]
    tok_dir = ckpt if (ckpt / "tokenizer_config.json").is_file() else Path(base) if base else None
    if tok_dir is None or not (tok_dir / "tokenizer_config.json").is_file():
        raise UserError(f"{ckpt}: no tokenizer in the checkpoint and the base model ({base}) is not reachable "
                        "-- convert on the machine that trained it")

    with new_dir(out) as tmp:
        for name in weights:
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)
        for shard in ckpt.glob("model-*-of-*.safetensors"):
            shutil.copy2(shard, tmp / shard.name)
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
        if is_adapter and base:
            # the adapter names its base by the path it was trained from, so PEFT / AutoPeft find it
            config = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = str(base)
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        extra = {k: v for k, v in facts.items() if k != "system_prompt"}
        write_assistant_file(tmp, facts["system_prompt"], **{**extra, "source_checkpoint": str(ckpt)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer convert", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="WORK_DIR/checkpoint-N, or a WORK_DIR (newest complete checkpoint)")
    p.add_argument("out", help="new directory for the clean adapter")
    args = p.parse_args(argv)
    out = convert(args.checkpoint, args.out)
    print(f"clean {'adapter' if (out / 'adapter_config.json').is_file() else 'model'} written to {out}")
    return 0
