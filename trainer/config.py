"""Training configuration: one dataclass, YAML presets, `key=value` overrides, strict checking.

    python -m trainer list-cfg [-p PATTERN]        # shipped presets
    python -m trainer copy-cfg NAME DIR            # copy one to edit, like `xtuner copy-cfg`
    python -m trainer train NAME_OR_YAML --set lr=1e-4 --set epochs=3

Presets live in `trainer/presets/*.yaml`; each file's header says what it is for and how to run it.
Unknown keys are rejected with the closest valid name; every value is checked in `__post_init__`.
"""
from __future__ import annotations

import dataclasses
import difflib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class TrainConfig:
    # --- what to train ---
    model: str = "tiny"                  # base model dir (HF format); "tiny" = the embedded demo base
    data: list[str] = field(default_factory=list)  # conversation files (OpenAI/Alpaca/ShareGPT)
    work_dir: str = "work_dirs/run"      # checkpoints, logs, sample chats and final/ adapter land here
    system_prompt: str | None = None     # prepended to conversations without one; saved with the adapter
    # --- method ---
    method: str = "lora"                 # lora | full
    bits: int | None = None              # 4 (QLoRA nf4) | 8 | None (no quantization)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target: str = "all-linear"      # PEFT target_modules: "all-linear" or comma-separated names
    dtype: str = "auto"                  # auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU)
    gradient_checkpointing: bool = False
    # --- data shaping ---
    max_length: int = 512                # tokens per conversation; longer ones are truncated
    packing: bool = False                # concatenate short conversations (attention kept per sample)
    # --- optimisation ---
    epochs: float = 1.0
    max_steps: int = -1                  # > 0 overrides epochs
    batch_size: int = 8                  # per device
    grad_accum: int = 1
    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    # --- watching it learn ---
    logging_steps: int = 10
    evaluation_freq: int = 0             # steps between sample chats (0: only before and after)
    evaluation_inputs: list[str] = field(default_factory=list)
    eval_max_new_tokens: int = 64
    save_steps: int = 0                  # 0: save only the final adapter
    save_total_limit: int = 3

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        checks = [
            (self.method in ("lora", "full"), "method must be 'lora' or 'full'"),
            (self.bits in (None, 4, 8), "bits must be 4, 8 or none"),
            (not (self.bits and self.method == "full"), "bits 4/8 needs method lora (QLoRA)"),
            (self.dtype in ("auto", "bf16", "fp16", "fp32"), "dtype must be auto, bf16, fp16 or fp32"),
            (self.lora_r > 0 and self.lora_alpha > 0, "lora_r and lora_alpha must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.max_length >= 16, "max_length must be >= 16"),
            (self.epochs > 0 or self.max_steps > 0, "set epochs > 0 or max_steps > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.logging_steps >= 1, "logging_steps must be >= 1"),
            (self.evaluation_freq >= 0 and self.save_steps >= 0, "evaluation_freq/save_steps must be >= 0"),
            (self.save_total_limit >= 1, "save_total_limit must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"config: {msg}")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_keys(keys, source) -> None:
    for key in keys:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" -- did you mean {close[0]!r}?" if close else f" -- valid keys: {', '.join(FIELDS)}"
            raise UserError(f"{source}: unknown config key {key!r}{hint}")


def _parse_value(key: str, raw: str):
    """`--set key=value`: the value is YAML ("3", "1e-4", "true", "[a, b]", "none")."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    if FIELDS[key].type in ("float", "float | None") and isinstance(value, int):
        return float(value)
    return value


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    close = difflib.get_close_matches(name_or_path, preset_names(), n=1)
    hint = f" -- did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown preset {name_or_path!r}{hint} (see `python -m trainer list-cfg`)")


def load_config(name_or_path: str, overrides: dict | None = None, sets: list[str] = ()) -> TrainConfig:
    """Preset or YAML file, then explicit overrides (CLI flags), then `--set key=value` strings."""
    path = resolve_preset(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of key: value")
    _check_keys(raw, path)
    values = dict(raw)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, raw_value = item.split("=", 1)
        _check_keys([key.strip()], "--set")
        values[key.strip()] = _parse_value(key.strip(), raw_value)
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise UserError(f"{path}: {exc}") from None


def save_config(cfg: TrainConfig, path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), allow_unicode=True, sort_keys=False),
                          encoding="utf-8")


def list_cfg(pattern: str | None = None) -> list[str]:
    return [n for n in preset_names() if not pattern or pattern.lower() in n.lower()]


def copy_cfg(name: str, out_dir) -> Path:
    src = resolve_preset(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{src.stem}_copy.yaml"
    shutil.copyfile(src, dst)
    return dst
