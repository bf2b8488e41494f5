"""Fine-tune a chat model on conversations: LoRA / QLoRA / full, assistant-only loss, HF Trainer.

    python -m trainer train tiny --data data/identity.jsonl --work-dir work_dirs/demo
    python -m trainer train internlm2_chat_1_8b_qlora --model /root/model --data data.jsonl
    python -m trainer train my.yaml --set lr=1e-4 --set epochs=3 --bits 4 [--resume [CKPT]]

Writes `WORK_DIR/checkpoint-N/` (every `save_steps`; sealed and rotated by trainer/engine/checkpoints.py),
`WORK_DIR/final/` (PEFT adapter, tokenizer with its chat template, `assistant.json` with the system
prompt), `scalars.jsonl`, `loss.png`, `eval_outputs_step_N.txt`, `config.yaml`, and TensorBoard
events in `runs/` when tensorboard is installed. Runs on CUDA when present, else CPU (QLoRA too).
`--resume` continues the newest complete checkpoint with the same data order.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from inference.device import cpu_has_fast_bf16, pick
from inference.loader import check_model_dir, param_count, quantization_config, write_assistant_file
from trainer.engine import checkpoints
from trainer.engine import distributed
from inference.atomic import replace_dir
from trainer.engine.callbacks import LogLine, LossPlot, ProgressBar, SampleChats
from trainer.engine.config import TrainConfig, resolve_bits, save_config
from trainer.engine.dataset import MIN_STEPS, choose_packing, collator_for, digest, encode_files, optimizer_steps
from inference.errors import UserError
from trainer.engine.retain import RetainTrainer
from trainer.engine.speed import apply_speedups
from trainer.engine.eval_callback import IdentityEval

log = logging.getLogger("trainer")


def keep_4bit_training_layout(model) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights into an inference-only layout the first time a CPU with
    AVX512-BF16 runs them in eval mode without grad (sample chats, identity eval, between steps) and
    never unpacks them: every later backward through them is silently wrong. Training keeps its layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model_for_training(cfg: TrainConfig, model_dir: Path, placement):
    qconf = quantization_config(cfg.bits, placement.dtype)
    attn = cfg.attn_implementation
    if attn == "flex_attention" and str(placement.device).startswith("cpu"):
        # torch's FlexAttention has no backward on CPU; sdpa computes the same function there
        log.warning("attn_implementation flex_attention trains on CUDA only -- using sdpa on the CPU")
        attn = "sdpa"
    dtype = placement.dtype
    if cfg.method == "full" and cfg.master_fp32 and dtype != torch.float32:
        # the trained weights are the fp32 master copy; the Trainer's bf16/fp16 autocast (FSDP2: its
        # mixed-precision all-gather) computes in `dtype`. bf16 weights would drop most lr-1e-5 updates.
        dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=qconf,
                                                 device_map={"": placement.device}, attn_implementation=attn)
    model.config.use_cache = False
    if qconf is not None:
        keep_4bit_training_layout(model)
    if cfg.method == "full":
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        if not cfg.fp32_upcast and placement.dtype != torch.float32:
            # undo the library's upcast of the frozen non-quantized weights: the residual stream then
            # stays in the compute dtype instead of fp32 (torchtune's and unsloth's QLoRA do the same)
            for param in model.parameters():
                if param.dtype == torch.float32 and param.__class__.__name__ != "Params4bit":
                    param.data = param.data.to(placement.dtype)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    target = cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    skip_adapter_input_casts(model)
    return model


def _cast_outside_autocast(cast, x, dtype):
    return x if x is not None and torch.is_autocast_enabled(x.device.type) else cast(x, dtype)


def skip_adapter_input_casts(model) -> int:
    """Stop PEFT's LoRA layers from copying their input to the adapters' fp32 before the adapter matmul
    while autocast is on (the Trainer's bf16/fp16 on CUDA); returns how many layers. Autocast computes that
    matmul in bf16 anyway, so the copy (one per adapted linear -- q, k and v each their own -- with the
    dropout then run on fp32) is pure memory traffic; PEFT's bitsandbytes layers already skip it under
    autocast, its plain Linear does not. Without autocast (CPU runs) the cast happens as before. Measured on
    the course's job (1.8B shape, H100, eager): bf16 LoRA ran 0.90 s a step against QLoRA's 0.785 before
    this (docs/BENCHMARKS.md, session 9)."""
    n = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "_cast_input_dtype"):
            module._cast_input_dtype = functools.partial(_cast_outside_autocast, module._cast_input_dtype)
            n += 1
    return n


def prepare_work_dir(work_dir: Path, model_dir: Path, cfg: TrainConfig, resume, echo,
                     overwrite: bool = False) -> Path | None:
    """Pick the checkpoint to resume (checked against this base model and method) and clear what an
    interrupted or earlier run left behind; refuse to silently mix a new run into an old one, or to
    replace a finished one (its final/, logs and sample chats) without OVERWRITE."""
    checkpoint = checkpoints.find_resume(work_dir, resume)
    if checkpoint is not None:
        checkpoints.check_compatible(checkpoint, model_dir, cfg)
    elif checkpoints.complete_checkpoints(work_dir):
        raise UserError(f"{work_dir}: holds checkpoints of an earlier run -- add --resume to continue it, "
                        "or choose a new --work-dir")
    elif not overwrite and ((work_dir / "final").exists() or (work_dir / "scalars.jsonl").exists()):
        raise UserError(f"{work_dir}: holds an earlier run (final/ or scalars.jsonl) -- add --overwrite to replace "
                        "it, or choose a new --work-dir")
    if work_dir.is_dir() and distributed.is_main_process():     # several processes: one cleans up
        checkpoints.sweep_incomplete(work_dir, echo)
        checkpoints.forget_after(work_dir, checkpoints.step_of(checkpoint) if checkpoint else -1)
    return checkpoint


def report_to() -> list[str]:
    """TensorBoard when it is installed (events in WORK_DIR/runs/), else nothing extra."""
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def cast_weights(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite FOLDER's fp32 safetensors files in `dtype`, one file at a time: a full fine-tune with fp32
    master weights ships in its compute dtype, as DeepSpeed's 16-bit gather does (half the size)."""
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        if any(t.dtype == torch.float32 for t in tensors.values()):
            save_file({k: t.to(dtype) if t.dtype == torch.float32 else t for k, t in tensors.items()},
                      path, metadata={"format": "pt"})
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["dtype"] = str(dtype).replace("torch.", "")
        config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_final(trainer, tokenizer, cfg: TrainConfig, model_dir: Path, work_dir: Path,
               dtype: torch.dtype = torch.float32) -> Path:
    """WORK_DIR/final, written beside and renamed into place: never half-written."""
    final, tmp = work_dir / "final", work_dir / ".final.tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))           # every rank: FSDP gathers the full weights for rank 0
    if not trainer.is_world_process_zero():
        return final                       # several GPUs (trainer/engine/distributed.py): rank 0 writes the rest
    if cfg.method == "full" and cfg.master_fp32 and dtype != torch.float32:
        cast_weights(tmp, dtype)           # the fp32 master copy trained; the model ships in `dtype`
    tokenizer.save_pretrained(tmp)
    (tmp / "training_args.bin").unlink(missing_ok=True)      # a pickle nobody needs to load an adapter
    write_assistant_file(tmp, cfg.system_prompt, base_model=str(model_dir), method=cfg.method, bits=cfg.bits)
    return replace_dir(tmp, final)


def train(cfg: TrainConfig, resume: str | bool | None = None, echo=print, model_dir=None,
          overwrite: bool = False) -> Path:
    """Run training; return the final output dir (adapter, or full model for method=full). MODEL_DIR is
    the base's dir when `cfg.model` names an embedded base (resolved by trainer/bases/registry.py)."""
    work_dir = Path(cfg.work_dir)
    model_dir = Path(model_dir) if model_dir is not None else check_model_dir(cfg.model)
    placement = pick("auto", cfg.dtype)
    if cfg.bits == "auto":
        bits, why = resolve_bits(placement.device, param_count(model_dir), cfg.memory_budget_gib)
        cfg = dataclasses.replace(cfg, bits=bits)      # config.yaml, checkpoints and assistant.json record it
        echo(f"bits auto: {why}")
    if cfg.bits and placement.device == "cpu" and cfg.dtype == "auto":
        placement = pick("cpu", "fp32")
    elif placement.device == "cpu" and cfg.dtype == "auto" and cfg.method == "lora" and cpu_has_fast_bf16():
        # bf16 frozen weights under fp32 LoRA weights (PEFT keeps adapters in fp32): 1.55x on AMX CPUs, 1.4x with
        # AVX512-BF16 alone (2 EPYC cores, session 11; docs/BENCHMARKS.md "CPU training of the real base")
        placement = pick("cpu", "bf16")
    checkpoint = prepare_work_dir(work_dir, model_dir, cfg, resume, echo, overwrite)   # fail fast, before loading
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise UserError(f"{model_dir}: tokenizer has no chat template -- use a chat model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    samples, stats = encode_files(cfg.data, tokenizer, cfg.max_length, cfg.system_prompt, retain=cfg.retain_kl > 0)
    batch = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    packed, rows = choose_packing(cfg.packing, samples, cfg.max_length, batch, cfg.epochs, cfg.max_steps)
    steps = optimizer_steps(len(rows), batch, cfg.epochs, cfg.max_steps)
    if steps < MIN_STEPS:
        echo(f"warning: this run makes only {steps} optimizer steps ({len(rows)} rows, batch {batch}, "
             f"{cfg.epochs:g} epochs) -- too few to learn much: use more data, more epochs or a smaller batch")
    data_digest = digest(rows)
    if checkpoint is not None and checkpoints.read_marker(checkpoint).get("data_digest") != data_digest:
        echo(f"warning: the data differ from what {checkpoint.name} was trained on: the resumed run "
             "will not follow the original data order")
    work_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main_process():
        save_config(cfg, work_dir / "config.yaml")
    echo(f"data: {stats['samples']} conversations ({stats['truncated']} truncated, {stats['dropped']} dropped)"
         + (f", packed into {len(rows)} rows of <= {cfg.max_length} tokens" if packed else ", not packed"))
    model = load_model_for_training(cfg, model_dir, placement)
    model = apply_speedups(model, cfg, echo)     # trainer/engine/speed.py: fused loss, compile, partial checkpointing
    echo(f"model: {model_dir} on {placement.describe()}, method {cfg.method}"
         + (f", {cfg.bits}-bit" if cfg.bits else "")
         + (", fp32 master weights" if cfg.method == "full" and next(model.parameters()).dtype == torch.float32
            and placement.dtype != torch.float32 else ""))

    bar = ProgressBar() if ProgressBar.wanted() else None
    if bar is not None:
        from tqdm.auto import tqdm

        echo = tqdm.write         # log lines print above the bar instead of through it
    collator = collator_for(cfg, tokenizer.pad_token_id, packed)     # compile: static shapes, no recompiles
    on_gpu = placement.device == "cuda"
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=None,                 # rotation is checkpoints.rotate: marker first, then files
        seed=cfg.seed, data_seed=cfg.seed,
        bf16=on_gpu and placement.dtype == torch.bfloat16, fp16=on_gpu and placement.dtype == torch.float16,
        use_cpu=not on_gpu, report_to=report_to(), disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, save_only_model=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not packed else "random",
        ddp_find_unused_parameters=False)   # every trainable weight gets a gradient: skip DDP's graph walk
    callbacks = [SampleChats(tokenizer, cfg, echo), LogLine(collator, cfg, echo), LossPlot(),
                 checkpoints.CheckpointKeeper(cfg, model_dir, data_digest)]
    callbacks += [IdentityEval(tokenizer, cfg, model_dir, echo)] if cfg.eval_identity else []   # trainer/evaluation/evaluate.py
    marked = cfg.retain_kl > 0 and any(any(r["retain"]) for r in rows)
    if cfg.retain_kl and not marked:
        echo("warning: retain_kl is set but no conversation is marked \"retain\" -- nothing to keep "
             "(`python -m trainer data --mix ...` marks the general ones)")
    trainer = RetainTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                            processing_class=tokenizer, callbacks=callbacks + ([bar] if bar else []),
                            retain_kl=cfg.retain_kl if marked else 0.0)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if checkpoint is not None:
        echo(f"resuming from {checkpoint} (step {checkpoints.step_of(checkpoint)})")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    final = save_final(trainer, tokenizer, cfg, model_dir, work_dir, placement.dtype)
    echo(f"saved {'model' if cfg.method == 'full' else 'adapter'} to {final}")
    return final
