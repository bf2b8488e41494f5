"""Trainer callbacks: sample chats while training, one-line logs with tokens/s and memory, a progress
bar on a terminal, and the files a run leaves behind (`scalars.jsonl`, `loss.png`,
`eval_outputs_step_N.txt`). Checkpoint sealing and rotation live in `trainer/engine/checkpoints.py`.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from inference.engine import ChatEngine
from trainer.engine.plot import plot_loss


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB (Linux)
    except Exception:
        return 0.0


def all_ranks_sum(n: int) -> int:
    """`n` summed over the processes of a several-GPU run (trainer/engine/distributed.py), else `n`: tokens/s
    in the logs is then the whole job's, whatever the number of processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([n], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total.item())


class SampleChats(TrainerCallback):
    """Answer `evaluation_inputs` before training, every `evaluation_freq` steps and at the end, with
    the same chat template and system prompt as the training data. Subclasses change what is asked
    (`wanted`, `samples`); when and where the answers go stays here."""

    def __init__(self, tokenizer, cfg, log):
        self.tokenizer, self.cfg, self.log = tokenizer, cfg, log

    def wanted(self) -> bool:
        return bool(self.cfg.evaluation_inputs)

    def samples(self, model) -> list[str]:
        """One `Q: ...\nA: ...` block per question (the model is in eval mode)."""
        fast = self.fast_decode(model)
        try:
            return self._ask_all(ChatEngine(model, self.tokenizer, system_prompt=self.cfg.system_prompt,
                                            fast_decode=fast))
        except Exception as e:         # the fast path is an optimisation: never let it stop a training run
            if not fast:
                raise
            self.log(f"sample chats: fast decode failed ({type(e).__name__}: {e}) -- using generate")
            self._fast_ok = False
            return self._ask_all(ChatEngine(model, self.tokenizer, system_prompt=self.cfg.system_prompt))

    def _ask_all(self, engine) -> list[str]:
        return [f"Q: {q}\nA: {self.ask(engine, q)}\n" for q in self.cfg.evaluation_inputs]

    _fast_ok = True

    def fast_decode(self, model):
        """On one CUDA GPU, sample chats replay a captured decode step (inference/fast_decode.py, no
        compilation; 252 vs 58 tokens/s for a 1.8B model on an H200, docs/BENCHMARKS.md). Several
        processes (FSDP gathers weights inside forward) and flex_attention models (their generate runs
        sdpa, trainer/engine/speed.py; the captured step would call flex directly) keep `generate`."""
        import torch.distributed as dist

        from trainer.engine.speed import causal_lm

        single = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
        flex = getattr(causal_lm(model).config, "_attn_implementation", None) == "flex_attention"
        return "graph" if self._fast_ok and single and not flex and model.device.type == "cuda" else False

    def ask(self, engine, question: str) -> str:
        return engine.chat([{"role": "user", "content": question}], max_new_tokens=self.cfg.eval_max_new_tokens)

    def _run(self, model, step: int, writer: bool = True):
        if not self.wanted():
            return
        was_training = model.training
        model.eval()
        try:
            text = "\n".join(self.samples(model))
        finally:
            if was_training:
                model.train()
        if not writer:        # several processes all generate (FSDP needs every rank), rank 0 writes
            return
        Path(self.cfg.work_dir, f"eval_outputs_step_{step}.txt").write_text(text, encoding="utf-8")
        self.log(f"sample chats at step {step}:\n" + text.rstrip())

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self._run(model, 0, state.is_world_process_zero)

    def on_step_end(self, args, state, control, model=None, **kw):
        freq = self.cfg.evaluation_freq
        if freq and state.global_step % freq == 0 and state.global_step != state.max_steps:
            self._run(model, state.global_step, state.is_world_process_zero)

    def on_train_end(self, args, state, control, model=None, **kw):
        self._run(model, state.global_step, state.is_world_process_zero)


class LogLine(TrainerCallback):
    """`step 20/120 | loss 1.234 | lr 1.9e-04 | 5,120 tok/s | eta 0:01:10 | peak 0.4 GiB`, and scalars.jsonl."""

    def __init__(self, collator, cfg, log):
        self.collator, self.cfg, self.log = collator, cfg, log
        self.scalars = Path(cfg.work_dir) / "scalars.jsonl"

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.tok0, self.step0 = time.time(), self.collator.tokens_seen, state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        if "loss" not in logs:
            return
        tokens = all_ranks_sum(self.collator.tokens_seen - self.tok0)   # every rank calls: a collective
        if not state.is_world_process_zero:
            return
        elapsed = max(time.time() - self.t0, 1e-6)
        done = state.global_step - self.step0
        tps = tokens / elapsed
        eta = (state.max_steps - state.global_step) * elapsed / max(done, 1)
        rec = {"step": state.global_step, "max_steps": state.max_steps, "loss": logs["loss"],
               "lr": logs.get("learning_rate", 0.0), "tokens_per_s": round(tps, 1),
               "peak_gib": round(peak_memory_gib(), 3), "elapsed_s": round(elapsed, 4),
               "tokens": int(tokens)}     # exact count, all ranks: the rounded rate x time drifts by ~3% on short runs
        if "retain_kl" in logs:
            rec["retain_kl"] = logs["retain_kl"]     # KL(base || tuned) on the retained answers (retain.py)
        with self.scalars.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        kl = f"kl {rec['retain_kl']:.4f} | " if "retain_kl" in rec else ""
        self.log(f"step {rec['step']}/{rec['max_steps']} | loss {rec['loss']:.4f} | {kl}lr {rec['lr']:.2e} | "
                 f"{tps:,.0f} tok/s | eta {datetime.timedelta(seconds=round(eta))} | "
                 f"peak {rec['peak_gib']:.2f} GiB")


class LossPlot(TrainerCallback):
    """Redraw `loss.png` from scalars.jsonl at every checkpoint and at the end."""

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_loss(args.output_dir)

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_loss(args.output_dir)


class ProgressBar(TrainerCallback):
    """A tqdm bar on stderr (only when it is a terminal: logs piped to a file stay clean)."""

    def __init__(self):
        self.bar = None

    @staticmethod
    def wanted() -> bool:
        return sys.stderr.isatty()

    def on_train_begin(self, args, state, control, **kw):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
