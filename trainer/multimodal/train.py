"""Train a LLaVA model in the course's two stages, on the text engine's HF Trainer setup.

    python -m trainer mm-train llava_tiny_pretrain --data data/shapes/captions.jsonl
    python -m trainer mm-train llava_tiny_finetune --data data/shapes/questions.jsonl \
        --set pretrained_projector=work_dirs/llava_tiny_pretrain/final
    python -m trainer mm-train llava_internlm2_chat_1_8b_qlora_finetune --model models/internlm2-chat-1_8b \
        --visual-encoder models/clip-vit-large-patch14-336 --data repeated_data.json --image-folder llava_data/ \
        --set pretrained_projector=work_dirs/llava_pretrain/final [--resume [CKPT]]

stage pretrain: the vision tower and the LLM are frozen; only the MLP projector learns (image-caption
pairs). stage finetune: LoRA (QLoRA with bits 4) on the LLM's linear layers (optionally the vision
tower's) plus the projector as a fully trained module; loss on assistant tokens only in both.
Leaves `WORK_DIR/final/`: projector.safetensors, processor, llava.json (how to rebuild the base),
assistant.json, and for finetune the PEFT adapter; plus checkpoints, scalars.jsonl, sample chats.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from inference.atomic import new_dir
from inference.device import pick
from inference.loader import write_assistant_file
from trainer.engine import checkpoints
from trainer.engine.callbacks import LogLine, LossPlot, ProgressBar
from inference.errors import UserError
from trainer.multimodal.callbacks import LlavaFilesOnSave, SampleImageChats, write_run_files
from trainer.multimodal.config import MultimodalConfig, load_mm_config, save_mm_config
from trainer.multimodal.data import LlavaCollator, encode_records, image_folder_for, read_llava_records
from inference.llava_model import open_image
from inference.llava_model import LLAVA_FILE, image_token_count, load_base, load_projector
from trainer.multimodal.model import base_spec
from trainer.engine.train import keep_4bit_training_layout, prepare_work_dir, report_to

def lora_target(model, cfg: MultimodalConfig) -> str:
    """A PEFT regex over the LLM's linear layers (all of them, or the names in `lora_target`), plus the
    vision tower's with `vision_lora`; never the projector (trained whole) nor lm_head."""
    def leaves(prefix):
        return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                       if name.startswith(prefix) and isinstance(m, nn.Linear)})

    llm = leaves("model.language_model.")
    if cfg.lora_target != "all-linear":
        wanted = [t.strip() for t in cfg.lora_target.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in llm]
        if unknown:
            raise UserError(f"config: lora_target {unknown} not among the LLM's linear layers {llm}")
        llm = wanted
    parts = [rf"model\.language_model\..*\.({'|'.join(llm)})"]
    if cfg.vision_lora:
        parts.append(rf"model\.vision_tower\..*\.({'|'.join(leaves('model.vision_tower.'))})")
    return "|".join(parts)


def prepare_stage(model, cfg: MultimodalConfig):
    """Freeze what the stage does not train; trainable weights are kept in fp32 (mixed precision
    computes in bf16/fp16 anyway, the optimizer should not step in half precision)."""
    model.requires_grad_(False)
    model.config.get_text_config().use_cache = False
    if cfg.gradient_checkpointing:     # non-reentrant: gradients reach the projector through frozen layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.stage == "pretrain":
        proj = model.model.multi_modal_projector
        proj.to(torch.float32).requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    tower = {r"model\.vision_tower\..*": cfg.vision_lora_r} if cfg.vision_lora else {}
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_target(model, cfg), modules_to_save=["multi_modal_projector"],
                      rank_pattern=tower, alpha_pattern={k: cfg.vision_lora_alpha for k in tower},
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def evaluation_images(cfg: MultimodalConfig) -> list[Path]:
    """Evaluation images as given, else relative to the image folder; checked before any training."""
    folder = image_folder_for(cfg.data[0], cfg.image_folder) if cfg.data else Path(".")
    out = []
    for img in cfg.evaluation_images:
        path = Path(img) if Path(img).is_file() else folder / img
        open_image(path, f"config evaluation_images {img!r}").close()
        out.append(path)
    return out


def fingerprint(samples: list[dict]) -> str:
    """What is trained on, in order, images included: a resumed run must see the same rows."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s["input_ids"], s["labels"], s["image"]]).encode())
    return h.hexdigest()[:16]


def check_resume_stage(checkpoint: Path | None, cfg: MultimodalConfig) -> None:
    info = checkpoint / LLAVA_FILE if checkpoint else None
    if info and info.is_file():
        stage = json.loads(info.read_text(encoding="utf-8")).get("stage")
        if stage != cfg.stage:
            raise UserError(f"{checkpoint}: a stage {stage} checkpoint cannot resume stage {cfg.stage} -- "
                            f"for finetune after pretrain, set pretrained_projector={checkpoint}")


def save_final(trainer, model, processor, cfg: MultimodalConfig, info: dict, work_dir: Path) -> Path:
    """WORK_DIR/final through inference/atomic.py, as the text engine's: written beside, swapped in only
    when complete (an older final/ stays until then), usual permissions; a failure leaves nothing."""
    final = work_dir / "final"
    with new_dir(final, replace=True) as tmp:
        if cfg.stage == "finetune":
            trainer.save_model(str(tmp))          # the PEFT adapter (the projector inside as a saved module)
            (tmp / "training_args.bin").unlink(missing_ok=True)
        write_run_files(tmp, model, processor, info)
        write_assistant_file(tmp, cfg.system_prompt,
                             base_model=str(info["base"].get("llava") or info["base"]["llm"]))
    return final


def train_mm(cfg: MultimodalConfig, resume=None, echo=print, extra_callbacks=()) -> Path:
    """Run one stage; return WORK_DIR/final. `extra_callbacks` (TrainerCallback) watch it, e.g. a benchmark."""
    if not cfg.data:
        raise UserError("no training data: pass --data FILE (LLaVA records; try `python -m trainer mm-shapes`)")
    work_dir = Path(cfg.work_dir)
    placement = pick("auto", cfg.dtype)
    if cfg.bits and placement.device == "cpu" and cfg.dtype == "auto":
        placement = pick("cpu", "fp32")
    records = [r for path in cfg.data for r in read_llava_records(path, cfg.image_folder)]   # fail fast,
    images = evaluation_images(cfg)                                                            # before loading
    spec = base_spec(cfg)
    base_dir = Path(spec.get("llava") or spec["llm"])
    check_resume_stage(checkpoints.find_resume(work_dir, resume), cfg)       # before anything is touched
    checkpoint = prepare_work_dir(work_dir, base_dir, cfg, resume, echo)
    set_seed(cfg.seed)
    model, processor = load_base(spec, placement.dtype, placement.device, cfg.bits, scratch=work_dir)
    if cfg.bits:
        keep_4bit_training_layout(model)        # sample image chats run between steps (trainer/engine/train.py)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_image = image_token_count(model.config)
    samples, stats = encode_records(records, tokenizer, model.config.image_token_id, n_image, cfg.max_length,
                                    cfg.system_prompt)
    if not samples:
        raise UserError(f"{cfg.data[0]}: no trainable samples (all cut by max_length={cfg.max_length}? each "
                        f"image alone takes {n_image} tokens)")
    if cfg.pretrained_projector:
        echo(f"projector: loaded {load_projector(model, cfg.pretrained_projector)}")
    digest = fingerprint(samples)
    if checkpoint is not None and checkpoints.read_marker(checkpoint).get("data_digest") != digest:
        echo(f"warning: the data differ from what {checkpoint.name} was trained on: the resumed run "
             "will not follow the original data order")
    model = prepare_stage(model, cfg)
    work_dir.mkdir(parents=True, exist_ok=True)
    save_mm_config(cfg, work_dir / "config.yaml")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    echo(f"data: {stats['samples']} conversations ({stats['images']} with an image, {n_image} tokens each; "
         f"{stats['truncated']} truncated, {stats['dropped']} dropped)")
    echo(f"model: {base_dir} + vision {spec.get('visual_encoder', '(in the LLaVA dir)')} on {placement.describe()}, "
         f"stage {cfg.stage}" + (f", {cfg.bits}-bit" if cfg.bits else "") + f", {trainable:,} trainable parameters")

    info = {"stage": cfg.stage, "base": spec, "image_tokens": n_image,
            "pretrained_projector": cfg.pretrained_projector}
    bar = ProgressBar() if ProgressBar.wanted() else None
    if bar is not None:
        from tqdm.auto import tqdm

        echo = tqdm.write
    collator = LlavaCollator(tokenizer.pad_token_id, processor.image_processor)
    on_gpu = placement.device == "cuda"
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=None,                 # rotation is trainer/engine/checkpoints.py's, as in the text engine
        seed=cfg.seed, data_seed=cfg.seed,
        bf16=on_gpu and placement.dtype == torch.bfloat16, fp16=on_gpu and placement.dtype == torch.float16,
        use_cpu=not on_gpu, report_to=report_to(), disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, save_only_model=False)
    callbacks = [SampleImageChats(processor, cfg, images, echo), LogLine(collator, cfg, echo), LossPlot(),
                 LlavaFilesOnSave(processor, info),       # before the keeper: its marker lists these files too
                 checkpoints.CheckpointKeeper(cfg, base_dir, digest)]
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collator,
                      processing_class=tokenizer, callbacks=callbacks + list(extra_callbacks) + ([bar] if bar else []))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if checkpoint is not None:
        echo(f"resuming from {checkpoint} (step {checkpoints.step_of(checkpoint)})")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    final = save_final(trainer, model, processor, cfg, info, work_dir)
    echo(f"saved {'adapter + projector' if cfg.stage == 'finetune' else 'projector'} to {final}")
    return final


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer mm-train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="llava_* preset name (see `list-cfg -p llava`) or a YAML path")
    p.add_argument("--model", help="LLM dir (or an assembled LLaVA dir); overrides the config")
    p.add_argument("--visual-encoder", help="CLIP dir or 'tiny'")
    p.add_argument("--data", action="append", help="LLaVA records file; repeat for several")
    p.add_argument("--image-folder", help="image paths in the data are relative to this")
    p.add_argument("--stage", choices=["pretrain", "finetune"])
    p.add_argument("--work-dir")
    p.add_argument("--bits", choices=["4", "8", "none"], help="finetune: 4 = QLoRA (nf4) on the LLM, none = off")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set lr=1e-4")
    p.add_argument("--resume", nargs="?", const="latest", help="continue from the latest (or given) checkpoint")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_mm_config(args.config, {"model": args.model, "visual_encoder": args.visual_encoder, "data": args.data,
                                       "image_folder": args.image_folder, "stage": args.stage,
                                       "work_dir": args.work_dir},
                         list(args.sets) + ([f"bits={args.bits}"] if args.bits else []))
    logging.basicConfig(level=logging.WARNING)
    train_mm(cfg, resume=args.resume, echo=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    from inference.errors import run_cli

    sys.exit(run_cli(main))
