"""Stand-ins for the course's downloads, small enough to build offline in seconds on CPU: a CLIP-style
vision tower and a chat LLM that both know the toy world of trainer/multimodal/synthetic.py.

    from trainer.multimodal.standins import build_shapes_llm, train_tiny_vision
    llm = build_shapes_llm(data["caption_text"], "work/llm")          # a chat LLM dir (HF format)
    tower = train_tiny_vision(data["captions"], "work/tiny-clip")     # a CLIPVisionModel dir

Why not the random tower and the general tiny base? LLaVA's stage 1 trains only the projector, so
it can only *ground* what the two frozen models already know: CLIP already sees "red" and "circle",
and a real chat LLM already writes "a red circle". A random tower keeps colour but buries shape, and
the 2k-vocabulary tiny base spells "square" with a byte token and "triangle" in five pieces, which a
frozen LLM steered through 16 soft tokens cannot reliably produce. So the tower here is trained a few
seconds to tell the 9 classes apart, and the LLM is a tiny Llama with a domain tokenizer (whole
words) that has read caption requests and captions as text, mostly with the picture described in the
request ("The picture shows a red circle. Describe the image briefly.") so that it learned to use its
context -- nothing about colour or shape questions, which stage finetune teaches.
"""
from __future__ import annotations

from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: list[str], vocab: int = 400):
    """A byte-level BPE (the `tokenizers` library: no sentencepiece) with ChatML specials and the
    repo's ChatML template; a small corpus with a roomy vocabulary gives whole-word tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from inference.chat_format import chatml_template

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", additional_special_tokens=SPECIALS[4:])
    fast.chat_template = chatml_template()
    return fast


def domain_texts() -> list[str]:
    """Every prompt, question, answer and caption of the toy world (the tokenizer's corpus)."""
    from trainer.multimodal import synthetic as s

    texts = s.CAPTION_PROMPTS + s.COLOUR_QUESTIONS + s.SHAPE_QUESTIONS + ["user", "assistant", "system"]
    texts += [s.caption(c, sh) for c in s.COLOURS for sh in s.SHAPES]
    texts += [s.CONTEXT.format(s.caption(c, sh)) for c in s.COLOURS for sh in s.SHAPES]
    texts += [s.colour_answer(c) for c in s.COLOURS] + [s.shape_answer(sh) for sh in s.SHAPES]
    return texts * 20


def build_shapes_llm(caption_text, out_dir, steps: int = 150, seed: int = 0, echo=None) -> Path:
    """A ~1M-parameter chat Llama that answers caption requests with a caption (the one the request
    describes, else a random one), trained from scratch by the text engine on `caption_text`
    (synthetic.caption_text_chats). Written beside `out_dir` and moved into place; returns it."""
    import shutil
    import tempfile

    from inference.atomic import check_new_dir, replace_dir
    from trainer.engine.config import TrainConfig
    from trainer.bases.tiny import build_random_model
    from trainer.engine.train import train

    out_dir = check_new_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        build_random_model(build_tokenizer(domain_texts()), work / "random", seed, hidden=128, layers=4)
        cfg = TrainConfig(model=str(work / "random"), data=[str(caption_text)], work_dir=str(work / "run"),
                          method="full", max_steps=steps, batch_size=32, lr=3e-3, warmup_ratio=0.05, max_length=64,
                          packing=False, logging_steps=max(1, steps // 3), seed=seed)
        final = train(cfg, echo=echo or (lambda s: None))
        (final / "assistant.json").unlink(missing_ok=True)
        replace_dir(final, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def train_tiny_vision(captions_path, out_dir, steps: int = 200, seed: int = 0, feature_layer: int = -2,
                      image_folder=None) -> Path:
    """The tiny tower (TINY_VISION, built from config) trained for a few seconds to tell the 9 colour x
    shape classes of the caption images apart, read from the hidden layer LLaVA will use. Saves a
    CLIPVisionModel dir with its image processor, usable as `visual_encoder`."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from inference.llava_model import open_image
    from trainer.multimodal.data import read_llava_records
    from inference.llava_model import TINY_VISION, make_image_processor
    from trainer.multimodal.synthetic import COLOURS, SHAPES, caption

    records = read_llava_records(captions_path, image_folder)
    classes = [caption(c, s) for c in COLOURS for s in SHAPES]
    labels = torch.tensor([classes.index(r["messages"][-1]["content"]) for r in records])
    processor = make_image_processor(TINY_VISION["image_size"], pad_to_square=False)
    pixels = processor(images=[open_image(r["image"], r["where"]) for r in records], return_tensors="pt")["pixel_values"]
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    head = torch.nn.Linear(tower.config.hidden_size, len(classes))
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (64,))
        hidden = tower(pixels[idx], output_hidden_states=True).hidden_states[feature_layer][:, 1:]
        loss = torch.nn.functional.cross_entropy(head(hidden.mean(1)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    from inference.atomic import new_dir

    with new_dir(out_dir) as tmp:          # whole or not at all: a half-saved tower would load as garbage
        tower.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)
