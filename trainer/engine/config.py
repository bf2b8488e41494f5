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
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from inference.errors import UserError

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


@dataclass
class TrainConfig:
    # --- what to train ---
    model: str = "tiny"                  # base model dir (HF format); "tiny" = the embedded demo base
    data: list[str] = field(default_factory=list)  # conversation files (OpenAI/Alpaca/ShareGPT JSON/JSONL)
    work_dir: str = "work_dirs/run"      # checkpoints, logs, sample chats and final/ adapter land here
    system_prompt: str | None = None     # prepended to conversations without one; saved with the adapter
    # --- method ---
    method: str = "lora"                 # lora (an adapter; with bits 4 it is QLoRA) | full (every weight)
    bits: int | str | None = None        # 4: nf4 + double quant, bf16 compute (QLoRA) | 8: int8 | None: off |
                                         # auto: none on CUDA when the bf16 weights fit memory_budget_gib, else 4
    memory_budget_gib: float = 24.0      # bits auto: the GPU memory this run may use (`resolve_bits`)
    lora_r: int = 16                     # adapter rank: how much the update can express
    lora_alpha: int = 32                 # adapter scale is lora_alpha / lora_r
    lora_dropout: float = 0.05           # dropout on the adapter's input (0 for tiny data sets)
    lora_target: str = "all-linear"      # PEFT target_modules: "all-linear" or comma-separated names
    dtype: str = "auto"                  # auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA; CPU: fp32, LoRA bf16 with native bf16)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps
    checkpoint_fraction: float = 1.0     # with gradient_checkpointing: recompute only this share of layers
    compile: bool = False                # torch.compile the decoder layers (trainer/engine/speed.py; CUDA; CPU 1.1-1.4x)
    fused_loss: bool = False             # chunked loss, no [tokens x vocab] logits in memory (trainer/engine/speed.py)
    fp32_upcast: bool = True             # QLoRA: PEFT's fp32 copies of embeddings, norms, lm_head (false: keep
                                         # them bf16 -- half the activation memory and traffic, as torchtune)
    master_fp32: bool = True             # full FT on a bf16/fp16 GPU: fp32 weights + AdamW state, compute in
                                         # `dtype` (mixed precision, as DeepSpeed); false: all in `dtype` --
                                         # half the memory, but updates under ~0.4% of a weight round away
    attn_implementation: str = "sdpa"    # sdpa | flex_attention (block-sparse over packed rows; CUDA) | eager
    # --- data shaping ---
    max_length: int = 512                # tokens per conversation (and per packed row); longer is truncated
    packing: bool | str = "auto"         # concatenate short conversations into rows (attention kept per
                                         # conversation); auto: pack when that at least halves the rows
    group_by_length: bool = False        # unpacked: batch conversations of similar length (HF's length-grouped
                                         # sampler), so short identity chats are not padded to long answers
    # --- optimisation ---
    epochs: float = 1.0                  # passes over the data (fractions allowed)
    max_steps: int = -1                  # > 0 overrides epochs
    batch_size: int = 8                  # rows per device per micro-step
    grad_accum: int = 1                  # micro-steps per optimizer step (batch = batch_size * grad_accum)
    lr: float = 2e-4                     # peak learning rate (AdamW)
    lr_scheduler: str = "cosine"         # transformers SchedulerType: cosine | linear | constant | ...
    warmup_ratio: float = 0.03           # fraction of the steps spent warming the lr up from 0
    weight_decay: float = 0.0            # AdamW weight decay
    max_grad_norm: float = 1.0           # gradient clipping norm
    seed: int = 42                       # adapter init, data order, dropout: same seed, same run
    retain_kl: float = 0.0               # weight of KL(base || tuned) on the answers of conversations marked
                                         # "retain" (the general ones `trainer data` mixes in): keeps the base's
                                         # whole next-token distribution there, not only its top token (retain.py)
    # --- watching it learn ---
    logging_steps: int = 10              # one log line and one scalars.jsonl record every N steps
    evaluation_freq: int = 0             # steps between sample chats (0: only before and after)
    evaluation_inputs: list[str] = field(default_factory=list)  # questions answered in the sample chats
    eval_max_new_tokens: int = 64        # answer length cap in the sample chats
    save_steps: int = 0                  # checkpoint every N steps (0: save only the final adapter)
    save_total_limit: int = 3            # keep this many newest checkpoints; the latest is always kept
    eval_identity: bool = False          # score identity/leakage/retention at each save, keep best/ (trainer/evaluation/evaluate.py)
    eval_data: str | None = None         # held-out identity questions (`python -m trainer data --eval-out FILE`)
    retention_tolerance: float = 0.1     # best/ = best identity among checkpoints with retention >= 1 - this

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        checks = [   # (key the message is about, holds, what to do)
            ("method", self.method in ("lora", "full"), "method must be 'lora' or 'full'"),
            ("bits", self.bits in (None, 4, 8, "auto"), "bits must be 4, 8, auto or none"),
            ("bits", not (self.bits and self.method == "full"), f"bits {self.bits} needs method lora (QLoRA)"),
            ("memory_budget_gib", self.memory_budget_gib > 0, "memory_budget_gib must be > 0"),
            ("dtype", self.dtype in ("auto", "bf16", "fp16", "fp32"), "dtype must be auto, bf16, fp16 or fp32"),
            ("packing", self.packing in (True, False, "auto"), "packing must be true, false or auto"),
            ("lora_r", self.lora_r > 0 and self.lora_alpha > 0, "lora_r and lora_alpha must be > 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            ("max_length", self.max_length >= 16, "max_length must be >= 16"),
            ("epochs", self.epochs > 0 or self.max_steps > 0, "set epochs > 0 or max_steps > 0"),
            ("batch_size", self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            ("lr", self.lr > 0, "lr must be > 0"),
            ("retain_kl", self.retain_kl >= 0, "retain_kl must be >= 0 (0: off)"),
            ("retain_kl", not (self.retain_kl and self.method == "full"),
             "retain_kl needs the base's distribution: method lora (the adapters switched off give it)"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            ("logging_steps", self.logging_steps >= 1, "logging_steps must be >= 1"),
            ("evaluation_freq", self.evaluation_freq >= 0, "evaluation_freq must be >= 0"),
            ("save_steps", self.save_steps >= 0, "save_steps must be >= 0"),
            ("save_total_limit", self.save_total_limit >= 1, "save_total_limit must be >= 1"),
            ("eval_max_new_tokens", self.eval_max_new_tokens >= 1, "eval_max_new_tokens must be >= 1"),
            ("eval_data", not self.eval_identity or (bool(self.eval_data) and self.save_steps > 0),
             "eval_identity needs eval_data (from `python -m trainer data --eval-out FILE`) and save_steps > 0"),
            ("retention_tolerance", 0 <= self.retention_tolerance <= 1, "retention_tolerance must be in [0, 1]"),
            ("checkpoint_fraction", 0 < self.checkpoint_fraction <= 1, "checkpoint_fraction must be in (0, 1]"),
            ("attn_implementation", self.attn_implementation in ("sdpa", "flex_attention", "eager"),
             "attn_implementation must be sdpa, flex_attention or eager"),
        ]
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(key, msg)
        schedulers = scheduler_names()
        if self.lr_scheduler not in schedulers:
            close = difflib.get_close_matches(self.lr_scheduler, schedulers, n=1)
            hint = f" -- did you mean {close[0]!r}?" if close else f" -- one of: {', '.join(schedulers)}"
            raise ConfigError("lr_scheduler", f"unknown lr_scheduler {self.lr_scheduler!r}{hint}")


BF16_SHARE = 0.5    # bits auto: bf16 weights may fill this share of the budget; the rest is activations,
                    # the adapter and its optimizer state (1.8B shape: 3.5 GiB of weights, 15 GiB peak at 4 x 2,048)


def resolve_bits(device: str, n_params: int, budget_gib: float) -> tuple[int | None, str]:
    """`bits: auto` -> (bits, why): bf16 LoRA (no quantisation) on CUDA when the model's bf16 weights
    take at most BF16_SHARE of the memory budget, else 4-bit QLoRA; on the CPU never 4-bit (the
    weights stay in the CPU's dtype: bitsandbytes' CPU kernels are slower than plain matmuls there)."""
    gib = n_params * 2 / 2**30
    if device != "cuda":
        return None, f"{gib:.1f} GiB of bf16 weights, on the CPU: no quantisation"
    if gib <= BF16_SHARE * budget_gib:
        return None, f"{gib:.1f} GiB of bf16 weights fit the {budget_gib:g} GiB budget: bf16 LoRA"
    return 4, f"{gib:.1f} GiB of bf16 weights exceed {BF16_SHARE:.0%} of the {budget_gib:g} GiB budget: 4-bit QLoRA"


class ConfigError(UserError):
    """A bad value; `key` lets `load_config` point at the YAML line or flag it came from."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"config: {msg}")
        self.key, self.msg = key, msg


def scheduler_names() -> list[str]:
    from transformers import SchedulerType     # imported here: `list-cfg` should not wait for torch

    return [s.value for s in SchedulerType]


def _coerce(name: str, kind: str, value):
    """Check one value against its field's annotation. Numbers written as strings are accepted
    because YAML 1.1 reads `2e-4` (no dot) as a string -- a classic way to lose an afternoon."""
    def bad(expected):
        return ConfigError(name, f"{name} must be {expected}, got {value!r}")

    if value is None:
        if "None" in kind:
            return None
        raise bad(kind)
    if isinstance(value, str) and value.lower() in ("none", "null") and "None" in kind:
        return None
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        if "str" in kind and isinstance(value, str):      # packing: "auto"
            return value.lower()
        raise bad("true or false" + (" or auto" if "str" in kind else ""))
    if kind.startswith(("int", "float")):
        if "str" in kind and isinstance(value, str) and not re.fullmatch(r"\s*[-+.\deE]+\s*", value):
            return value.lower()                          # bits: auto
        if isinstance(value, bool):
            raise bad("a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(number):
            raise bad("a finite number")
        if kind.startswith("float"):
            return number
        if number != int(number):
            raise bad("a whole number")
        return int(number)
    if kind.startswith("list"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise bad("a list of strings")
        return list(items)
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# What users coming from transformers' TrainingArguments or XTuner configs type; difflib can't guess these.
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "max_epochs": "epochs",
           "per_device_train_batch_size": "batch_size", "batch_size_per_device": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "accumulative_counts": "grad_accum",
           "pretrained_model_name_or_path": "model", "output_dir": "work_dir", "lora_rank": "lora_r",
           "r": "lora_r", "target_modules": "lora_target", "evaluation_steps": "evaluation_freq",
           "max_seq_length": "max_length", "pack_to_max_length": "packing", "torch_dtype": "dtype"}


def check_keys(keys, source, lines: dict | None = None, fields=None, aliases=None) -> None:
    """Refuse keys the config (TrainConfig unless `fields` says) does not have; `lines` (key -> line
    number) makes the error FILE:LINE."""
    fields = FIELDS if fields is None else fields
    aliases = ALIASES if aliases is None else aliases
    for key in keys:
        if key not in fields:
            # matched against the aliases too, so a misspelt `lerning_rate` still leads to `lr`
            close = difflib.get_close_matches(key, [*fields, *aliases], n=1)
            close = [aliases.get(close[0], close[0])] if close else []
            hint = f" -- did you mean {close[0]!r}?" if close else f" -- valid keys: {', '.join(fields)}"
            line = f":{lines[key]}" if lines and key in lines else ""
            raise UserError(f"{source}{line}: unknown config key {key!r}{hint}")


def _parse_value(key: str, raw: str):
    """`--set key=value`: the value is YAML ("3", "1e-4", "true", "[a, b]", "none")."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"--set {key}={raw}: not a valid YAML value") from None


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
    command = preset_command(path)
    if command not in (None, "train"):
        raise UserError(f"{path}: this preset is for `python -m trainer {command}`, not `train`")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of key: value")
    lines = key_lines(text)
    check_keys(raw, path, lines)
    values = dict(raw)
    # where each value came from, for errors
    origin = {key: f"{path}:{lines[key]}" if key in lines else str(path) for key in raw}
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key], origin[key] = value, f"--{key.replace('_', '-')}"
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, raw_value = (part.strip() for part in item.split("=", 1))
        check_keys([key], "--set")
        values[key], origin[key] = _parse_value(key, raw_value), f"--set {key}"
    try:
        return TrainConfig(**values)
    except ConfigError as exc:
        raise UserError(f"{origin.get(exc.key, path)}: {exc.msg}") from None


def key_lines(text: str) -> dict[str, int]:
    """The 1-based line of each top-level key of a YAML mapping, from the parser's own node marks
    (so quoted keys, flow style and indented documents are placed right, not guessed from the text)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def save_config(cfg: TrainConfig, path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), allow_unicode=True, sort_keys=False),
                          encoding="utf-8")


def list_cfg(pattern: str | None = None) -> list[str]:
    return [n for n in preset_names() if not pattern or pattern.lower() in n.lower()]


def preset_command(path) -> str | None:
    """The command that runs a preset: its header shows `python -m trainer COMMAND NAME ...`
    (NAME = the preset, also in a `copy-cfg` copy, whose header is the original's)."""
    path = Path(path)
    names = {path.stem, path.stem.removesuffix("_copy")}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        for command, arg in re.findall(r"python -m trainer (\S+) (\S+)", line):
            if arg in names:
                return command
    return None


def copy_cfg(name: str, out_dir) -> Path:
    """Copy a preset to `OUT_DIR/NAME_copy.yaml` to edit (never overwrites)."""
    src = resolve_preset(name)
    out_dir = Path(out_dir)
    dst = out_dir / f"{src.stem}_copy.yaml"
    if dst.exists():
        raise UserError(f"{dst}: already exists -- edit it, or copy into another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
