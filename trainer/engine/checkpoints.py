"""Checkpoints that survive `kill -9`: a completion marker, rotation, and the checks made on resume.

The HF Trainer writes `WORK_DIR/checkpoint-N/` file by file (PEFT adapter or full weights, tokenizer,
optimizer, scheduler, RNG state, `trainer_state.json`). A process killed halfway leaves a directory
that looks like a checkpoint but is not. So here a checkpoint counts only when its marker
`checkpoint.json` -- written last, atomically, listing every file with its size -- is present and
every listed file still has that size. Rotation (`save_total_limit`, newest kept) is done here too,
removing the marker *before* the files, so a kill during deletion leaves an ignored husk, never a
complete-looking checkpoint. Incomplete husks are swept away when a run starts.

The marker also records the base model's shape and the method, so `--resume` from a checkpoint of a
different base model fails with one line instead of a tensor-shape traceback.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import TrainerCallback

from inference.loader import write_assistant_file
from inference.atomic import usual_modes, write_text
from inference.errors import UserError
from trainer.workdir import MARKER, read_scalars, all_checkpoints, complete_checkpoints, read_marker, step_of  # noqa: F401 (re-exported)

# config.json keys that pin down which base model a checkpoint belongs to
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads")
# config keys a resumed run must share with the checkpoint, or the saved state cannot load
_METHOD_KEYS = ("method", "bits", "lora_r", "lora_alpha", "lora_target")
# restored from the checkpoint's optimizer/scheduler state whatever the config says: a change would be
# written to config.yaml and the model card while training went on with the old values
_SCHEDULE_KEYS = ("lr", "lr_scheduler", "warmup_ratio")


def base_fingerprint(model_dir) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)       # multimodal configs nest the language model
    return {key: text.get(key, config.get(key)) for key in _SHAPE_KEYS}


def write_marker(ckpt: Path, base_dir, cfg, data_digest: str) -> None:
    files = {p.relative_to(ckpt).as_posix(): p.stat().st_size
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MARKER}
    record = {"step": step_of(ckpt), "base_model": str(base_dir), "base": base_fingerprint(base_dir),
              "config": {k: getattr(cfg, k) for k in (*_METHOD_KEYS, *_SCHEDULE_KEYS) if hasattr(cfg, k)},
              "data_digest": data_digest,
              "files": files}
    write_text(ckpt / MARKER, json.dumps(record, ensure_ascii=False, indent=1))


def find_resume(work_dir, resume) -> Path | None:
    """`--resume` (True / "latest": the newest complete checkpoint in WORK_DIR) or `--resume DIR`."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        done = complete_checkpoints(work_dir)
        if not done:
            raise UserError(f"{work_dir}: --resume given but there is no complete checkpoint-N/ there "
                            "-- start without --resume, or pass --work-dir of the run to continue")
        return done[-1]
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"{path}: --resume checkpoint directory not found")
    if read_marker(path) is None:
        done = complete_checkpoints(path.parent)
        hint = f" -- newest complete one: {done[-1]}" if done else ""
        raise UserError(f"{path}: not a complete checkpoint (no valid {MARKER}; killed while saving?){hint}")
    return path


def check_compatible(ckpt: Path, base_dir, cfg) -> dict:
    """Refuse a checkpoint made from another base model or with another method; return its marker."""
    record = read_marker(ckpt)
    here = base_fingerprint(base_dir)
    if record["base"] != here:
        diff = ", ".join(f"{k} {record['base'][k]} vs {here[k]}" for k in _SHAPE_KEYS if record["base"][k] != here[k])
        raise UserError(f"{ckpt}: this checkpoint was trained on another base model ({record['base_model']}; "
                        f"{diff}) -- resume with --model {record['base_model']}, or start a new --work-dir")
    for key in _METHOD_KEYS:
        if record["config"].get(key) != getattr(cfg, key):
            raise UserError(f"{ckpt}: checkpoint has {key}={record['config'].get(key)!r} but the config says "
                            f"{getattr(cfg, key)!r} -- resume with the run's own config ({Path(ckpt).parent}/config.yaml)")
    for key in _SCHEDULE_KEYS:
        if key in record["config"] and hasattr(cfg, key) and record["config"][key] != getattr(cfg, key):
            raise UserError(f"{ckpt}: checkpoint has {key}={record['config'][key]!r} but the config says "
                            f"{getattr(cfg, key)!r} -- a resumed run keeps the checkpoint's optimizer and lr "
                            "schedule: drop the change, or start a new --work-dir with it")
    return record


def sweep_incomplete(work_dir, echo=print) -> None:
    """Delete checkpoint dirs a killed run left half-written (or half-deleted)."""
    for ckpt in all_checkpoints(work_dir):
        if read_marker(ckpt) is None:
            echo(f"removing incomplete {ckpt.name}/ (left by an interrupted run)")
            shutil.rmtree(ckpt, ignore_errors=True)


def rotate(work_dir, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints (so the latest always survives)."""
    done = complete_checkpoints(work_dir)
    for old in done[:-keep] if keep > 0 else []:
        (old / MARKER).unlink(missing_ok=True)      # first: from here on it never looks complete
        shutil.rmtree(old, ignore_errors=True)


def forget_after(work_dir, step: int) -> None:
    """Drop the log records and sample chats of steps after `step`: a resumed run writes them again
    (a fresh run passes -1 and starts with none, so no file mixes two runs)."""
    for old in Path(work_dir).glob("eval_outputs_step_*.txt"):
        number = old.stem.rsplit("_", 1)[1]
        if number.isdigit() and int(number) > step:
            old.unlink()
    path = Path(work_dir) / "scalars.jsonl"
    if not path.is_file():
        return
    kept = [record for record in read_scalars(work_dir) if record.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


class CheckpointKeeper(TrainerCallback):
    """After the Trainer has written checkpoint-N: add the system prompt file, seal it with the
    marker, then rotate old ones."""

    def __init__(self, cfg, base_dir, data_digest: str):
        self.cfg, self.base_dir, self.data_digest = cfg, base_dir, data_digest

    def on_save(self, args, state, control, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir() or not state.is_world_process_zero:     # one writer when several GPUs train
            return
        write_assistant_file(ckpt, self.cfg.system_prompt, base_model=str(self.base_dir), method=self.cfg.method,
                             bits=self.cfg.bits)
        usual_modes(ckpt)      # the Trainer wrote it in place through safetensors' private 0600 temp files
        write_marker(ckpt, self.base_dir, self.cfg, self.data_digest)
        rotate(args.output_dir, self.cfg.save_total_limit)
