"""Fine-tune a chat model on conversations: LoRA / QLoRA / full, assistant-only loss, HF Trainer.

    python -m trainer train tiny --data data/identity.jsonl --work-dir work_dirs/demo
    python -m trainer train internlm2_chat_1_8b_qlora --model /root/model --data data.jsonl
    python -m trainer train my.yaml --set lr=1e-4 --set epochs=3 [--resume [CKPT]]

Writes `WORK_DIR/checkpoint-N/` (every `save_steps`), `WORK_DIR/final/` (PEFT adapter, tokenizer with
its chat template, `assistant.json` with the system prompt), `scalars.jsonl`, `eval_outputs_step_N.txt`
and `config.yaml`. Runs on CUDA when present, else CPU.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from inference.device import pick
from inference.loader import check_model_dir, quantization_config, write_assistant_file
from trainer.callbacks import AssistantFileOnSave, LogLine, SampleChats
from trainer.config import TrainConfig, load_config, save_config
from trainer.dataset import Collator, encode_files, pack
from trainer.errors import UserError

log = logging.getLogger("trainer")


def resolve_model(name: str) -> Path:
    if name == "tiny":
        from trainer.tiny import default_base

        return default_base()
    return check_model_dir(name)


def load_model_for_training(cfg: TrainConfig, model_dir: Path, placement):
    qconf = quantization_config(cfg.bits, placement.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.dtype, quantization_config=qconf,
                                                 device_map={"": placement.device})
    model.config.use_cache = False
    if cfg.method == "full":
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    target = cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def find_checkpoint(work_dir: Path, resume: str | bool | None) -> str | None:
    if not resume:
        return None
    if resume is True or resume == "latest":
        ckpts = sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        ckpts = [c for c in ckpts if (c / "trainer_state.json").is_file()]
        if not ckpts:
            raise UserError(f"{work_dir}: --resume given but no checkpoint-N/ with trainer_state.json there")
        return str(ckpts[-1])
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"{path}: not a complete checkpoint (no trainer_state.json)")
    return str(path)


def train(cfg: TrainConfig, resume: str | bool | None = None, echo=print) -> Path:
    """Run training; return the final output dir (adapter, or full model for method=full)."""
    work_dir = Path(cfg.work_dir)
    model_dir = resolve_model(cfg.model)
    placement = pick("auto", cfg.dtype)
    if cfg.bits and placement.device == "cpu" and cfg.dtype == "auto":
        placement = pick("cpu", "fp32")
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise UserError(f"{model_dir}: tokenizer has no chat template -- use a chat model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    samples, stats = encode_files(cfg.data, tokenizer, cfg.max_length, cfg.system_prompt)
    rows = pack(samples, cfg.max_length) if cfg.packing else samples
    checkpoint = find_checkpoint(work_dir, resume)
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, work_dir / "config.yaml")
    echo(f"data: {stats['samples']} conversations ({stats['truncated']} truncated, {stats['dropped']} dropped)"
         + (f", packed into {len(rows)} rows of <= {cfg.max_length} tokens" if cfg.packing else ""))
    model = load_model_for_training(cfg, model_dir, placement)
    echo(f"model: {model_dir} on {placement.describe()}, method {cfg.method}"
         + (f", {cfg.bits}-bit" if cfg.bits else ""))

    collator = Collator(tokenizer.pad_token_id, packed=cfg.packing)
    on_gpu = placement.device == "cuda"
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed,
        bf16=on_gpu and placement.dtype == torch.bfloat16, fp16=on_gpu and placement.dtype == torch.float16,
        use_cpu=not on_gpu, report_to=[], disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, save_only_model=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                      processing_class=tokenizer,
                      callbacks=[SampleChats(tokenizer, cfg, echo), LogLine(collator, cfg, echo),
                                 AssistantFileOnSave(cfg)])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train(resume_from_checkpoint=checkpoint)

    final = work_dir / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    write_assistant_file(final, cfg.system_prompt, base_model=str(model_dir))
    echo(f"saved {'model' if cfg.method == 'full' else 'adapter'} to {final}")
    return final


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="preset name (see list-cfg) or path to a YAML config")
    p.add_argument("--model", help="base model dir (overrides the config)")
    p.add_argument("--data", action="append", help="conversation file; repeat for several")
    p.add_argument("--work-dir", help="where checkpoints and the final adapter go")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set lr=1e-4")
    p.add_argument("--resume", nargs="?", const="latest", help="continue from the latest (or given) checkpoint")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, {"model": args.model, "data": args.data, "work_dir": args.work_dir}, args.sets)
    logging.basicConfig(level=logging.WARNING)
    train(cfg, resume=args.resume, echo=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    from trainer.errors import run_cli

    sys.exit(run_cli(main))
