"""The course's LLaVA comparison, offline in a few minutes on CPU: caption-only before, answers after.

    python -m trainer mm-demo [WORK_DIR] [--pretrain-steps 150] [--finetune-steps 100]

1. draws the toy data set (`mm-shapes`): coloured shapes, captions, questions, held-out images;
2. builds stand-ins for the downloads (trainer/multimodal/standins.py): a tiny CLIP-style tower that
   sees the 9 classes, as CLIP's features do, and a tiny chat LLM that has read captions as text;
3. stage pretrain (`llava_tiny_pretrain`): only the projector learns, from captions;
4. "before": asks the held-out questions -> it answers with captions, like the course's iter_2181;
5. stage finetune (`llava_tiny_finetune`): LoRA + projector on the questions;
6. "after": the same questions -> answered, scored against the truth;
7. exports the merged transformers LLaVA dir and prints the `chat --image` command.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

CAPTION = re.compile(r"^a (red|green|blue) (circle|square|triangle)$")


def ask(llm, tower, trained, records, max_new_tokens: int = 12) -> list[tuple[str, str, str]]:
    """(question, greedy answer, truth) for LLaVA records, with the LLaVA rebuilt the course's way:
    the LLM + the tower + the run's projector (and adapter)."""
    from inference.image_chat import load_llava
    engine = load_llava(llm, records[0]["image"], llava=trained, visual_encoder=tower, device="cpu").engine()
    out = []
    for rec in records:
        question = rec["messages"][0]["content"].replace("<image>", "").strip()
        engine.set_image(rec["image"])
        reply = engine.chat([{"role": "user", "content": question}], max_new_tokens=max_new_tokens)
        out.append((question, reply.strip(), rec["messages"][1]["content"]))
    return out


def score(got: list[tuple[str, str, str]]) -> dict:
    """Exact answers per question kind, and how many replies were captions instead of answers."""
    kinds = {"colour": [], "shape": []}
    for q, a, truth in got:
        kinds["colour" if "colo" in q.lower() else "shape"].append(a == truth)
    return {"colour": (sum(kinds["colour"]), len(kinds["colour"])), "shape": (sum(kinds["shape"]), len(kinds["shape"])),
            "right": sum(map(sum, kinds.values())) / max(len(got), 1),
            "captions": sum(bool(CAPTION.match(a)) for _, a, _ in got), "n": len(got)}


def describe(s: dict) -> str:
    return (f"colour {s['colour'][0]}/{s['colour'][1]}, shape {s['shape'][0]}/{s['shape'][1]} right "
            f"({s['right']:.0%}; chance 33%), {s['captions']}/{s['n']} replies are captions")


def run_demo(work, pretrain_steps: int = 150, finetune_steps: int = 100, echo=print) -> dict:
    from trainer.multimodal.config import load_mm_config
    from trainer.multimodal.data import read_llava_records
    from trainer.multimodal.export import export_merged
    from trainer.multimodal.standins import build_shapes_llm, train_tiny_vision
    from trainer.multimodal.synthetic import write_shapes
    from trainer.multimodal.train import train_mm

    work = Path(work)
    data = write_shapes(work / "shapes", n=900, heldout=45)
    echo(f"1. toy data set in {work / 'shapes'}")
    tower = str(train_tiny_vision(data["captions"], work / "tiny-clip"))
    llm = str(build_shapes_llm(data["caption_text"], work / "llm"))
    echo(f"2. stand-ins: vision tower {tower}, LLM {llm}")
    quiet = (lambda s: None)
    common = {"model": str(llm), "visual_encoder": tower}
    pre = train_mm(load_mm_config("llava_tiny_pretrain", {**common, "data": [str(data["captions"])],
                                                          "work_dir": str(work / "pretrain")},
                                  [f"max_steps={pretrain_steps}"]), echo=quiet)
    held = read_llava_records(data["heldout"])
    before = ask(llm, tower, pre, held)
    echo(f"3-4. after pretrain (projector only), held-out: {describe(score(before))}")
    for q, a, _ in before[:2]:
        echo(f"     Q: {q}  A: {a}")
    ft = train_mm(load_mm_config("llava_tiny_finetune", {**common, "data": [str(data["questions"])],
                                                         "work_dir": str(work / "finetune")},
                                 [f"max_steps={finetune_steps}", f"pretrained_projector={pre}"]), echo=quiet)
    after = ask(llm, tower, ft, held)
    echo(f"5-6. after finetune (LoRA + projector), held-out: {describe(score(after))}")
    for q, a, _ in after[:2]:
        echo(f"     Q: {q}  A: {a}")
    merged = export_merged(ft, work / "merged")
    echo(f"7. merged transformers LLaVA model: {merged}\n   chat: python -m trainer chat {merged} --image "
         f"{held[0]['image']}")
    return {"before": score(before), "after": score(after), "merged": merged}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer mm-demo", description=__doc__.split("\n")[0])
    p.add_argument("work_dir", nargs="?", default="work_dirs/llava_demo")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--finetune-steps", type=int, default=100)
    args = p.parse_args(argv)
    from inference.errors import UserError

    if Path(args.work_dir).exists() and any(Path(args.work_dir).iterdir()):
        raise UserError(f"{args.work_dir}: already exists and is not empty -- choose a new directory")
    run_demo(args.work_dir, args.pretrain_steps, args.finetune_steps, echo=lambda s: print(s, flush=True))
    return 0
