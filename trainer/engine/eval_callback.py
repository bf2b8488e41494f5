"""Score identity / leakage / retention at every checkpoint while training, and keep WORK_DIR/best current.

Switched on by `eval_identity: true` (with `eval_data: HELDOUT.jsonl` and `save_steps > 0`) in a
training config; the scores are those of trainer/evaluation/evaluate.py, the report and the best-checkpoint rule
those of trainer/evaluation/report.py. best/ is copied the moment a checkpoint becomes the best, because
checkpoint rotation (`save_total_limit`) may delete it before training ends.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from inference.engine import ChatEngine
from inference.loader import load, read_system_prompt
from trainer.evaluation import report as eval_report
from trainer.data.self_distill import use_twins
from trainer.evaluation.evaluate import base_reference, build_eval_set, score


@contextmanager
def _eval_mode(model):
    """Generation inside training: eval mode (no dropout) and the KV cache on, both restored after."""
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = True
    try:
        yield
    finally:
        model.config.use_cache = use_cache
        if was_training:
            model.train()


class IdentityEval(TrainerCallback):
    def __init__(self, tokenizer, cfg, base_dir, log=print):
        self.tokenizer, self.cfg, self.base_dir, self.log = tokenizer, cfg, Path(base_dir), log
        self.work_dir = Path(cfg.work_dir)
        self.es = build_eval_set(cfg.eval_data)          # a bad file fails here, before any step
        self.max_new_tokens = cfg.eval_max_new_tokens
        self.ref, self.rows = None, []

    def _engine(self, model, system_prompt):
        return ChatEngine(model, self.tokenizer, system_prompt=system_prompt)

    def on_train_begin(self, args, state, control, model=None, **kw):
        base_prompt = read_system_prompt(self.base_dir)
        twins = use_twins(self.base_dir)          # a base that speaks no Chinese: see base_reference
        with _eval_mode(model):
            if hasattr(model, "disable_adapter"):      # LoRA: the base is the same weights, adapter off
                with model.disable_adapter():
                    self.ref = base_reference(self._engine(model, base_prompt), self.es, self.max_new_tokens, twins)
            elif state.global_step == 0:               # full fine-tuning, not started yet: it *is* the base
                self.ref = base_reference(self._engine(model, base_prompt), self.es, self.max_new_tokens, twins)
            else:                                      # full fine-tuning resumed: load the base beside it
                base_engine = load(self.base_dir, device=model.device.type).engine(fast_decode=False, cpu_decode="fp32")
                self.ref = base_reference(base_engine, self.es, self.max_new_tokens, twins)
        previous = self.work_dir / "eval_report.json"
        if state.global_step > 0 and previous.is_file():   # resumed: keep the rows already scored
            rows = json.loads(previous.read_text(encoding="utf-8")).get("checkpoints", [])
            self.rows = [r for r in rows if r.get("step") is not None and r["step"] <= state.global_step]
        b = self.ref.scores
        self.log(f"identity eval: base identity {b.identity:.2f}, leakage {b.leakage:.2f}, "
                 f"accuracy {b.accuracy:.2f} on {len(self.es.identity)} identity / {len(self.es.general)} general prompts")

    def on_save(self, args, state, control, model=None, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        with _eval_mode(model):
            s = score(self._engine(model, self.cfg.system_prompt), self.es, self.ref, self.max_new_tokens)
        row = eval_report.row(ckpt, state.global_step, s)
        self.rows.append(row)
        tolerance = self.cfg.retention_tolerance
        best = eval_report.choose_best(self.rows, tolerance)
        if not state.is_world_process_zero:      # several processes all score (FSDP needs every rank); rank 0 writes
            return
        if best is row and ckpt.is_dir():
            eval_report.write_best(ckpt, self.work_dir)
        eval_report.write_report(self.work_dir, self.rows, self.ref.scores, tolerance, self.es,
                                 base_path=self.base_dir, copy_best=False)
        self.log(f"identity eval at step {state.global_step}: identity {s.identity:.2f} | leakage {s.leakage:.2f} | "
                 f"retention {s.retention:.2f} | accuracy {s.accuracy:.2f}" + (" | best so far" if best is row else ""))

    def on_train_end(self, args, state, control, **kw):
        if not self.rows or not state.is_world_process_zero:
            return
        best = eval_report.choose_best(self.rows, self.cfg.retention_tolerance)
        self.log(eval_report.format_table(self.rows, self.ref.scores, best["path"] if best else None))
        if best:
            self.log(f"best checkpoint: {Path(best['path']).name} (step {best['step']}) -> {self.work_dir / 'best'}")
        else:
            self.log(eval_report.no_best_hint(self.rows, self.cfg.retention_tolerance,
                                              "--set retention_tolerance={}"))
