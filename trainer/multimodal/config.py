"""MultimodalConfig: the text engine's TrainConfig plus the LLaVA fields; `llava_*` YAML presets.

    python -m trainer mm-train llava_tiny_pretrain --set max_steps=100
    python -m trainer list-cfg -p llava                     # the shipped LLaVA presets

Presets live beside the text ones in `trainer/presets/` with a `llava_` prefix. Every TrainConfig key
means the same here (lr, batch_size, bits, lora_r, evaluation_inputs, save_steps ...); `model` is the
LLM (or an already assembled LLaVA dir) and `evaluation_inputs` are asked about each evaluation image.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from trainer.engine.config import ConfigError, TrainConfig, check_keys, key_lines, resolve_preset
from inference.atomic import write_text
from inference.errors import UserError


@dataclass
class MultimodalConfig(TrainConfig):
    stage: str = "finetune"               # pretrain: projector only, on captions | finetune: LoRA/QLoRA + projector
    visual_encoder: str | None = None     # CLIP dir (its vision half is used) or "tiny"; None when `model` is a LLaVA dir
    image_folder: str | None = None       # image paths in the data are relative to this (default: the data file's dir)
    vision_feature_layer: int = -2        # which CLIP hidden layer feeds the projector (LLaVA: the penultimate)
    pad_to_square: bool = False           # pad images to a square with the mean colour before resizing (course: finetune)
    pretrained_projector: str | None = None  # projector.safetensors (or a dir holding it) from the pretrain stage
    vision_lora: bool = False             # finetune: also put LoRA on the vision tower's linear layers
    vision_lora_r: int = 64               # its rank and alpha (XTuner's LLaVA configs: r 64, alpha 16)
    vision_lora_alpha: int = 16
    evaluation_images: list[str] = field(default_factory=list)  # sample chats ask evaluation_inputs about these
    build_seed: int = 0                   # seeds the fresh projector (and a "tiny" vision tower) when assembling
    packing: bool | str = False           # never: one image per row keeps features and placeholders aligned

    def __post_init__(self):
        super().__post_init__()
        checks = [   # (key, holds, what to do)
            ("stage", self.stage in ("pretrain", "finetune"), "stage must be 'pretrain' or 'finetune'"),
            ("method", self.method == "lora", "multimodal training is LoRA/QLoRA (method: lora); the "
             "projector is trained whole in both stages"),
            ("bits", not (self.stage == "pretrain" and self.bits), "stage pretrain trains only the projector on "
             "the full-precision LLM -- drop bits (QLoRA is for stage finetune)"),
            ("vision_lora", not (self.stage == "pretrain" and self.vision_lora), "vision_lora is a finetune option"),
            ("vision_lora_r", self.vision_lora_r > 0 and self.vision_lora_alpha > 0,
             "vision_lora_r and vision_lora_alpha must be > 0"),
            ("packing", self.packing in (False, "auto"), "packing is not supported for image conversations"),
            ("compile", not (self.compile or self.fused_loss or self.checkpoint_fraction < 1 or self.eval_identity),
             "compile, fused_loss, checkpoint_fraction and eval_identity are text-engine options, not LLaVA ones"),
        ]
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(key, msg)
        self.packing = False


FIELDS = {f.name: f for f in dataclasses.fields(MultimodalConfig)}


def load_mm_config(name_or_path: str, overrides: dict | None = None, sets=()) -> MultimodalConfig:
    """Preset name or YAML path, then CLI overrides, then `--set key=value` (value parsed as YAML);
    a bad value is reported at the YAML line or the flag it came from."""
    path = resolve_preset(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of key: value")
    lines = key_lines(path.read_text(encoding="utf-8"))       # trainer/engine/config.py: from the YAML node marks
    check_keys(raw, path, lines, fields=FIELDS, aliases={})
    values, origin = dict(raw), {key: f"{path}:{lines[key]}" if key in lines else str(path) for key in raw}
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key], origin[key] = value, f"--{key.replace('_', '-')}"
    for item in sets:
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep:
            raise UserError(f"--set {item!r}: expected key=value")
        check_keys([key], "--set", fields=FIELDS, aliases={})
        try:
            values[key], origin[key] = yaml.safe_load(text), f"--set {key}"
        except yaml.YAMLError:
            raise UserError(f"--set {key}={text}: not a valid YAML value") from None
    try:
        return MultimodalConfig(**values)
    except ConfigError as exc:
        raise UserError(f"{origin.get(exc.key, path)}: {exc.msg}") from None


def save_mm_config(cfg: MultimodalConfig, path) -> None:
    write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), allow_unicode=True, sort_keys=False))
