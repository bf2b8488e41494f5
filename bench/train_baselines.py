"""The standard training stacks bench/train_speed.py measures our engine against, one function each.

    python bench/train_speed.py run --impl baseline --batch 8 --accum 2 --ckpt --name base --root /tmp/bench
    python bench/train_speed.py run --impl plain_qlora --batch 8 --accum 2 --ckpt --attn causal --name pq --root /tmp/bench
    python bench/train_speed.py run --impl bf16_lora --batch 4 --accum 4 --ckpt --compile --name bf --root /tmp/bench

- baseline: QLoRA as the PEFT/bitsandbytes docs write it: `prepare_model_for_kbit_training` (fp32
  copies of embeddings, norms and lm_head, reentrant checkpointing) + nf4 + LoRA r64 all-linear.
- plain_qlora: the strongest standard QLoRA: nf4 frozen linear weights, everything else left in bf16
  (no `prepare_model_for_kbit_training`), bf16 autocast, non-reentrant checkpointing when `--ckpt`.
- bf16_lora: no quantisation: bf16 frozen weights + LoRA; `--compile` compiles each decoder layer
  (`nn.Module.compile`, torch's default shape handling, as torchtune compiles its layers).

All three train through transformers' Trainer with the engine's collator and log callback, seeded where
`trainer.engine.train.train()` seeds: the same packed rows in the same order, the same optimizer, lr
schedule and loss normalisation as ours, so their per-step losses and times compare. `--attn`: `sdpa`
(default) keeps each packed conversation to itself, as ours does (transformers builds a block-diagonal
mask from the restarting position ids); `causal` drops the position ids, so a row attends as one causal
sequence -- sdpa's plain causal (flash) kernel, the classic packing of TRL, a slightly different function.
On a CPU (the smoke test) the weights are fp32; plain_qlora quantises when bitsandbytes' nf4 runs on
the CPU, and otherwise says why and trains the same model unquantised.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

IMPLS = ("baseline", "plain_qlora", "bf16_lora")


def nf4_runs_here() -> tuple[bool, str]:
    """(ok, why not): CUDA always; on a CPU, whether bitsandbytes' nf4 layer runs forward and backward."""
    import torch

    if torch.cuda.is_available():
        return True, ""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to("cpu")
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return False, "bitsandbytes nf4 gave no finite input gradient on this CPU"
        return True, ""
    except Exception as exc:      # noqa: BLE001 -- any failure is the reason printed with the skip
        return False, f"bitsandbytes nf4 does not run on this CPU ({type(exc).__name__}: {str(exc)[:160]})"


def causal_rows(collator):
    """The collator's packed batches without position ids: each row attends as one causal sequence."""
    def collate(batch):
        out = collator(batch)
        out.pop("position_ids", None)
        return out
    return collate


def run_standard(a, work: Path, cfg, rows, tok, echo=print) -> dict:
    """Train `a.impl` for `a.steps` optimizer steps on ROWS; returns what the result should record about
    the run beyond the timings (quantised?, dtype, notes)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments, set_seed

    from trainer.engine.callbacks import LogLine
    from trainer.engine.dataset import Collator

    set_seed(cfg.seed)                     # where train() seeds: same LoRA init, same data order
    on_gpu = torch.cuda.is_available()
    name = a.dtype if a.dtype not in (None, "auto") else ("bf16" if on_gpu else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    quantise, note = a.impl in ("baseline", "plain_qlora"), ""
    if a.impl == "plain_qlora" and not on_gpu:
        quantise, why = nf4_runs_here()
        if not quantise:
            note = f"SKIP nf4: {why} -- plain_qlora trains the same model unquantised"
            echo(f"plain_qlora: {note}")
    qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if quantise else None    # as the engine's
    attn = "sdpa" if a.attn == "causal" else a.attn
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype, quantization_config=qconf,
                                                 attn_implementation=attn, device_map={"": "cuda" if on_gpu else "cpu"})
    model.config.use_cache = False
    if a.impl == "baseline":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.ckpt)
    elif a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    if a.impl == "bf16_lora" and a.compile:
        layers = model.get_base_model().get_decoder().layers
        for layer in layers:
            layer.compile()
        echo(f"bf16_lora: compiled {len(layers)} decoder layers")
    collator = Collator(tok.pad_token_id, packed=True)
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.accum,
        learning_rate=cfg.lr, max_steps=a.steps, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_strategy="no", seed=cfg.seed, data_seed=cfg.seed,
        bf16=on_gpu and dtype == torch.bfloat16, fp16=on_gpu and dtype == torch.float16, use_cpu=not on_gpu, report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0)
    callbacks = [LogLine(collator, cfg, lambda s: echo(s))]
    callbacks += [Profile(work, a.steps - a.profile, a.profile)] if a.profile else []
    data_collator = causal_rows(collator) if a.attn == "causal" else collator
    Trainer(model=model, args=args, train_dataset=rows, data_collator=data_collator, callbacks=callbacks).train()
    return {"quantised": bool(quantise), "dtype": str(dtype).replace("torch.", ""), "note": note}


def Profile(work: Path, start: int, steps: int):
    """A TrainerCallback that runs torch.profiler over `steps` optimizer steps after step `start` and
    writes where the time went: WORK/profile.txt (top kernels / ops) and WORK/profile.json (GPU busy
    share of the wall time, top 25 kernels by device time)."""
    import torch
    from transformers import TrainerCallback

    class _Profile(TrainerCallback):
        prof = None
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                acts += [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is None or state.global_step != start + steps:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            # kernels only: an aten op and the kernels it launches both carry the same device time
            dev = [e for e in events if getattr(e, "self_device_time_total", 0) > 0
                   and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA] or \
                  [e for e in events if getattr(e, "self_device_time_total", 0) > 0 and "::" not in e.key]
            busy = sum(e.self_device_time_total for e in dev) / 1e6
            top = sorted(dev, key=lambda e: -e.self_device_time_total)[:25]
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            (work / "profile.txt").write_text(events.table(sort_by=sort, row_limit=40, max_name_column_width=90))
            summary = {"steps": steps, "wall_s": wall, "device_busy_s": busy, "busy_share": busy / wall,
                       "top": [{"name": e.key[:120], "s": e.self_device_time_total / 1e6, "calls": e.count}
                               for e in top]}
            (work / "profile.json").write_text(json.dumps(summary, indent=1))
            print(f"PROFILE {steps} steps: wall {wall:.3f} s, device busy {busy:.3f} s ({busy / wall:.0%})", flush=True)
            for e in top[:12]:
                print(f"PROFILE {e.self_device_time_total / 1e6 / steps * 1e3:8.1f} ms/step {e.count // steps:6d}x "
                      f"{e.key[:90]}", flush=True)
            self.prof = None

    return _Profile()
