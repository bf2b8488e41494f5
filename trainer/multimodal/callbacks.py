"""Trainer callbacks of the LLaVA stages: sample chats about the evaluation images, and the files that
make every checkpoint usable on its own (projector, processor, llava.json), each written whole or not at
all (inference/atomic.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from inference.atomic import write_text
from trainer.engine.callbacks import SampleChats
from inference.llava_model import LLAVA_FILE, PROJECTOR_FILE
from trainer.multimodal.model import save_projector


def write_run_files(out_dir, model, processor, info: dict) -> None:
    """projector.safetensors + processor/tokenizer + llava.json (stage, how to rebuild the base)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_projector(model, out_dir / PROJECTOR_FILE)
    processor.save_pretrained(out_dir)
    write_text(out_dir / LLAVA_FILE, json.dumps(info, ensure_ascii=False, indent=2))


class SampleImageChats(SampleChats):
    """Ask `evaluation_inputs` about each of `evaluation_images` before training, every
    `evaluation_freq` steps and at the end (the course's evaluation_inputs, with an image)."""

    def __init__(self, processor, cfg, images: list[Path], log):
        super().__init__(processor, cfg, log)       # the processor stands in for the tokenizer
        self.processor, self.images = processor, images

    def wanted(self) -> bool:
        return super().wanted() and bool(self.images)

    def samples(self, model) -> list[str]:
        from inference.image_chat import ImageChatEngine
        lines = []
        for image in self.images:
            engine = ImageChatEngine(model, self.processor, image, system_prompt=self.cfg.system_prompt)
            lines += [f"[{image.name}] Q: {q}\nA: {self.ask(engine, q)}\n" for q in self.cfg.evaluation_inputs]
        return lines


class LlavaFilesOnSave(TrainerCallback):
    """Every checkpoint-N also holds the projector, the processor and llava.json, so `mm-export` and
    `chat --llava` work on any checkpoint, not only on final/."""

    def __init__(self, processor, info: dict):
        self.processor, self.info = processor, info

    def on_save(self, args, state, control, model=None, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            write_run_files(ckpt, model, self.processor, {**self.info, "step": state.global_step})
