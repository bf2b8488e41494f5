"""Trainer callbacks of the LLaVA stages: sample chats about the evaluation images, and the files that
make every checkpoint usable on its own (projector, processor, llava.json).
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from trainer.multimodal.model import LLAVA_FILE, PROJECTOR_FILE, save_projector


def write_run_files(out_dir, model, processor, info: dict) -> None:
    """projector.safetensors + processor/tokenizer + llava.json (stage, how to rebuild the base)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_projector(model, out_dir / PROJECTOR_FILE)
    processor.save_pretrained(out_dir)
    (out_dir / LLAVA_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")


class SampleImageChats(TrainerCallback):
    """Ask `evaluation_inputs` about each of `evaluation_images` before training, every
    `evaluation_freq` steps and at the end (the course's evaluation_inputs, with an image)."""

    def __init__(self, processor, cfg, images: list[Path], log):
        self.processor, self.cfg, self.images, self.log = processor, cfg, images, log

    def _run(self, model, step: int):
        if not (self.cfg.evaluation_inputs and self.images):
            return
        from trainer.multimodal.chat import ImageChatEngine

        was_training = model.training
        model.eval()
        lines = []
        for image in self.images:
            engine = ImageChatEngine(model, self.processor, image, system_prompt=self.cfg.system_prompt)
            for q in self.cfg.evaluation_inputs:
                reply = engine.chat([{"role": "user", "content": q}], max_new_tokens=self.cfg.eval_max_new_tokens)
                lines.append(f"[{image.name}] Q: {q}\nA: {reply}\n")
        if was_training:
            model.train()
        text = "\n".join(lines)
        Path(self.cfg.work_dir, f"eval_outputs_step_{step}.txt").write_text(text, encoding="utf-8")
        self.log(f"sample chats at step {step}:\n" + text.rstrip())

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self._run(model, 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        freq = self.cfg.evaluation_freq
        if freq and state.global_step % freq == 0 and state.global_step != state.max_steps:
            self._run(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kw):
        self._run(model, state.global_step)


class LlavaFilesOnSave(TrainerCallback):
    """Every checkpoint-N also holds the projector, the processor and llava.json, so `mm-export` and
    `chat --llava` work on any checkpoint, not only on final/."""

    def __init__(self, processor, info: dict):
        self.processor, self.info = processor, info

    def on_save(self, args, state, control, model=None, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            write_run_files(ckpt, model, self.processor, {**self.info, "step": state.global_step})
