"""A toy image data set drawn with PIL: one red/green/blue circle/square/triangle on a plain background.

    python -m trainer mm-shapes data/shapes [--n 300] [--heldout 45] [--size 32] [--seed 0]

Writes LLaVA records (images relative to OUT_DIR, the image folder to train with):
    captions.jsonl    pretrain pairs: "<image>\\n<caption request>" -> "a red circle"
    questions.jsonl   finetune: "what colour is the shape?" -> "It is red." / "what shape is it?" -> "It is a circle."
    heldout.jsonl     questions on images never trained on (other seed), to measure what was learned
    caption_text.jsonl  text-only caption chats: what the stand-in LLM reads (trainer/multimodal/standins.py)
It is what the offline test learns from, and a way to try `mm-train` end to end without downloads.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from trainer.data.formats import write_jsonl
from inference.errors import UserError

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = [(255, 255, 255), (235, 235, 235), (250, 240, 215), (215, 225, 235), (60, 60, 60)]
CAPTION_PROMPTS = ["", "Describe the image briefly.", "Write a short caption for this picture.",
                   "Give a brief description of the photo.", "Summarize the image in a few words."]
COLOUR_QUESTIONS = ["what colour is the shape?", "What color is it?", "Which colour is the shape in the picture?"]
SHAPE_QUESTIONS = ["what shape is it?", "What is the shape?", "Which shape is in the image?"]


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def colour_answer(colour: str) -> str:
    return f"It is {colour}."


def shape_answer(shape: str) -> str:
    return f"It is a {shape}."


def draw(colour: str, shape: str, size: int, rng: random.Random):
    """One image: the shape at a random place and scale, colour jittered, on a random plain background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    side = rng.uniform(0.6, 0.9) * size
    x0, y0 = rng.uniform(0, size - side), rng.uniform(0, size - side)
    box = [x0, y0, x0 + side, y0 + side]
    pen = ImageDraw.Draw(img)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return img


CONTEXT = "The picture shows {}."


def caption_text_chats(n: int, seed: int = 0) -> list[dict]:
    """Text-only chats "caption request -> caption": what the stand-in LLM reads before any image
    (trainer/multimodal/standins.py), as a real chat LLM already knows how to write captions. Most
    requests say what the picture shows, so the LLM learns to describe what its context holds (the
    image features will be that context); the rest have no clue and get a random caption."""
    rng = random.Random(seed)
    prompts = [p for p in CAPTION_PROMPTS if p]
    out = []
    for _ in range(n):
        cap = caption(rng.choice(list(COLOURS)), rng.choice(SHAPES))
        prompt = rng.choice(prompts)
        user = f"{CONTEXT.format(cap)} {prompt}" if rng.random() < 0.7 else prompt
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": cap}]})
    return out


def _record(rid: str, image: str, question: str, answer: str) -> dict:
    value = f"<image>\n{question}" if question else "<image>"
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": value},
                                                         {"from": "gpt", "value": answer}]}


def draw_images(out_dir: Path, prefix: str, n: int, size: int, seed: int) -> list[tuple[str, str, str]]:
    """`n` images balanced over the 9 colour x shape classes -> [(relative path, colour, shape)]."""
    rng = random.Random(seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    items = []
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour, shape = classes[i % len(classes)]
        rel = f"images/{prefix}{i:05d}.png"
        draw(colour, shape, size, rng).save(out_dir / rel)
        items.append((rel, colour, shape))
    rng.shuffle(items)
    return items


def write_shapes(out_dir, n: int = 300, heldout: int = 45, size: int = 32, seed: int = 0) -> dict:
    """Draw the images and write captions/questions/heldout JSONL; returns the file paths."""
    out_dir = Path(out_dir)
    if n < 9 or heldout < 0 or size < 8:
        raise UserError("mm-shapes: need --n >= 9, --heldout >= 0 and --size >= 8")
    rng = random.Random(seed + 1)
    train = draw_images(out_dir, "train", n, size, seed)
    captions = [_record(f"cap{i}", rel, rng.choice(CAPTION_PROMPTS), caption(c, s))
                for i, (rel, c, s) in enumerate(train)]
    questions = []
    for i, (rel, c, s) in enumerate(train):
        questions.append(_record(f"col{i}", rel, rng.choice(COLOUR_QUESTIONS), colour_answer(c)))
        questions.append(_record(f"shp{i}", rel, rng.choice(SHAPE_QUESTIONS), shape_answer(s)))
    held = []
    for i, (rel, c, s) in enumerate(draw_images(out_dir, "heldout", heldout, size, seed + 7919)):
        held.append(_record(f"hcol{i}", rel, COLOUR_QUESTIONS[0], colour_answer(c)))
        held.append(_record(f"hshp{i}", rel, SHAPE_QUESTIONS[0], shape_answer(s)))
    paths = {"captions": out_dir / "captions.jsonl", "questions": out_dir / "questions.jsonl",
             "heldout": out_dir / "heldout.jsonl", "caption_text": out_dir / "caption_text.jsonl",
             "image_folder": out_dir}
    write_jsonl(paths["caption_text"], caption_text_chats(n, seed))
    write_jsonl(paths["captions"], captions)
    write_jsonl(paths["questions"], questions)
    write_jsonl(paths["heldout"], held)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer mm-shapes", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=300, help="training images (balanced over 9 classes)")
    p.add_argument("--heldout", type=int, default=45, help="held-out images, two questions each")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_shapes(args.out_dir, args.n, args.heldout, args.size, args.seed)
    print(f"wrote {paths['captions']}, {paths['questions']}, {paths['heldout']} (image folder {args.out_dir})")
    return 0
