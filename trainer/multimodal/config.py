"""MultimodalConfig: the text engine's TrainConfig plus the LLaVA fields; `llava_*` YAML presets.

    python -m trainer mm-train llava_tiny_pretrain --set max_steps=100
    python -m trainer list-cfg -p llava                     # the shipped LLaVA presets

Presets live beside the text ones in `trainer/presets/` with a `llava_` prefix. Every TrainConfig key
means the same here (lr, batch_size, bits, lora_r, evaluation_inputs, save_steps ...); `model` is the
LLM (or an already assembled LLaVA dir) and `evaluation_inputs` are asked about each evaluation image.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

import yaml

from trainer.config import TrainConfig, resolve_preset
from trainer.errors import UserError


@dataclass
class MultimodalConfig(TrainConfig):
    stage: str = "finetune"               # pretrain: projector only, on captions | finetune: LoRA/QLoRA + projector
    visual_encoder: str | None = None     # CLIP dir (vision part used) or "tiny"; None when `model` is a LLaVA dir
    image_folder: str | None = None       # image paths in the data are relative to this (default: the data file's dir)
    vision_feature_layer: int = -2        # which CLIP hidden layer feeds the projector (LLaVA uses the penultimate)
    pad_to_square: bool = False           # pad images to a square with the mean colour before resizing (course: finetune)
    pretrained_projector: str | None = None  # projector.safetensors (or a dir holding it) from the pretrain stage
    vision_lora: bool = False             # finetune: also put LoRA on the vision tower's linear layers
    evaluation_images: list[str] = field(default_factory=list)  # sample chats ask evaluation_inputs about these
    build_seed: int = 0                   # seeds the fresh projector (and a "tiny" vision tower) when assembling

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.evaluation_images, str):
            self.evaluation_images = [self.evaluation_images]
        checks = [
            (self.stage in ("pretrain", "finetune"), "stage must be 'pretrain' or 'finetune'"),
            (self.method == "lora", "multimodal training is LoRA/QLoRA (method: lora); pretrain trains the projector"),
            (not (self.stage == "pretrain" and self.bits),
             "stage pretrain trains only the projector on the full-precision LLM -- drop bits (QLoRA is for finetune)"),
            (not (self.stage == "pretrain" and self.vision_lora), "vision_lora is a finetune option"),
            (not self.packing, "packing is not supported for image conversations (set packing: false)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"config: {msg}")


FIELDS = {f.name: f for f in dataclasses.fields(MultimodalConfig)}


def _check_keys(keys, source) -> None:
    for key in keys:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" -- did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{source}: unknown config key {key!r}{hint}")


def load_mm_config(name_or_path: str, overrides: dict | None = None, sets=()) -> MultimodalConfig:
    """Preset name or YAML path, then CLI overrides, then `--set key=value` (value parsed as YAML)."""
    path = resolve_preset(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of key: value")
    _check_keys(raw, path)
    values = dict(raw)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected key=value")
        _check_keys([key.strip()], "--set")
        value = yaml.safe_load(text)
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        if FIELDS[key.strip()].type in ("float", "float | None") and isinstance(value, int):
            value = float(value)
        values[key.strip()] = value
    try:
        return MultimodalConfig(**values)
    except TypeError as exc:
        raise UserError(f"{path}: {exc}") from None


def save_mm_config(cfg: MultimodalConfig, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, allow_unicode=True, sort_keys=False)
