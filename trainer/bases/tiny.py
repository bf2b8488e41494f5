"""Build the tiny offline base chat model: the embedded default and what every test uses.

    python -m trainer tiny OUT_DIR [--steps 500] [--seed 0]

1. trains a sentencepiece BPE tokenizer (byte fallback, so any name in any script encodes) on text
   this repo writes (`trainer/data/general.py` plus the identity question bank);
2. builds a ~2M-parameter Llama-architecture model from a config (random weights);
3. pre-trains it briefly on general chat (arithmetic, unit conversion, facts, greetings, and its own
   built-in identity "TinyChat"; some chained into long multi-turn chats) with the same training
   engine users run, so it holds a trivial conversation -- and has an identity of its own for tuning
   to override, like a real chat model.

The tokenizer is trained without normalization (`identity`), as the fast tokenizer built from it
applies none: full-width "，？" stay single tokens instead of NFKC-folded pieces the fast one lacks.

The result is a standard Hugging Face dir: `AutoModelForCausalLM` / `AutoTokenizer` load it, and its
tokenizer carries the ChatML template with `{% generation %}` markers.
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from inference.atomic import cache_root, check_new_dir, locked, replace_dir
from inference.chat_format import chatml_template
from trainer.data.formats import write_jsonl
from trainer.data.general import general_conversations
from trainer.data.identity import EN, HELDOUT_EN, HELDOUT_ZH, ZH

SPECIAL = ["<|im_start|>", "<|im_end|>"]
VERSION = "v3"    # bump when the recipe changes: invalidates the cached default base


def _tokenizer_text(path: Path, seed: int) -> None:
    lines = []
    for conv in general_conversations(4000, seed=seed, base_identity=True):
        lines += [m["content"] for m in conv["messages"]]
    for bank in (ZH, EN, HELDOUT_ZH, HELDOUT_EN):
        for items in bank.values():
            lines += items
    lines += ["user", "assistant", "system", "？，。！：；“”（）、", "?,.!:;()\"'"]
    path.write_text("\n".join(lines), encoding="utf-8")


def pretraining_chats(n: int, seed: int) -> list[dict]:
    """The general chat corpus, a third of it chained into longer conversations (up to ~120 tokens).
    Packing keeps conversations apart (positions restart), so with only one- or two-turn chats the base
    never sees a late position and loses the thread in a long chat; chained, it learns to answer the
    last question, whatever came before."""
    convs = general_conversations(n, seed=seed, base_identity=True)
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(convs):
        k = 1 if rng.random() < 2 / 3 else rng.randint(3, 6)
        out.append({"messages": [m for c in convs[i:i + k] for m in c["messages"]]})
        i += k
    return out


def build_tokenizer(work: Path, vocab_size: int, seed: int):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    text = work / "corpus.txt"
    _tokenizer_text(text, seed)
    spm_dir = work / "spm"
    spm_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(spm_dir / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=SPECIAL, unk_id=0, bos_id=1,
        eos_id=2, pad_id=3, num_threads=2, minloglevel=2, split_digits=True, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    tok = LlamaTokenizer.from_pretrained(spm_dir)     # converts the .model into a fast tokenizer
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.pad_token = "<pad>"
    tok.eos_token = "<|im_end|>"     # generation and the Trainer both stop on the template's end token
    tok.chat_template = chatml_template()
    return tok


def build_random_model(tok, out: Path, seed: int, hidden: int = 128, layers: int = 4):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        initializer_range=0.1, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=im_end, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[im_end],
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_tiny(out_dir, steps: int = 500, seed: int = 0, echo=print) -> Path:
    """Build tokenizer + model, pre-train on general chat, write to `out_dir` (atomically)."""
    from trainer.engine.config import TrainConfig
    from trainer.engine.train import train

    out = check_new_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-", dir=out.parent, ignore_cleanup_errors=True) as work:
        work = Path(work)
        tok = build_tokenizer(work, vocab_size=2000, seed=seed)
        build_random_model(tok, work / "random", seed)
        write_jsonl(work / "general.jsonl", pretraining_chats(6000, seed))
        if steps > 0:
            cfg = TrainConfig(model=str(work / "random"), data=[str(work / "general.jsonl")],
                              work_dir=str(work / "pretrain"), method="full", max_length=128, packing=True,
                              max_steps=steps, batch_size=8, lr=3e-3, warmup_ratio=0.05, logging_steps=50,
                              seed=seed, evaluation_inputs=["你好", "What is 3 plus 4?", "Who are you?"],
                              eval_max_new_tokens=24)
            result = train(cfg, echo=echo)
            for leftover in ("assistant.json", "training_args.bin"):
                (result / leftover).unlink(missing_ok=True)
        else:
            result = work / "random"
        replace_dir(result, out)
    echo(f"tiny base model written to {out}")
    return out


def default_base() -> Path:
    """The embedded default base, built once into the user cache (a minute or two on 2 CPU cores)."""
    path = cache_root() / f"tiny-base-{VERSION}"
    if (path / "config.json").is_file():
        return path
    with locked(path.with_name(path.name + ".lock")):       # two first starts build it once
        if not (path / "config.json").is_file():
            print(f"building the tiny demo base model into {path} (first use only)", flush=True)
            build_tiny(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer tiny", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=500, help="pre-training steps on general chat (0: random)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build_tiny(args.out_dir, steps=args.steps, seed=args.seed)
    return 0
