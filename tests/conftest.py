"""Shared, built-once fixtures: a tiny real base model, identity data, a tuned adapter, a merged model.

Everything is built offline at test time (no hub): the tiny base is a real Llama-architecture chat
model with a sentencepiece tokenizer trained here, pre-trained for a few hundred steps on the repo's
general-chat corpus. The session builds it once (~40 s on 2 cores) and every test reuses it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NAME, AUTHOR = "Lumi", "小菜鸡"


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def tiny_base(session_dir) -> Path:
    from trainer.bases.tiny import VERSION, build_tiny

    path = build_tiny(session_dir / "tiny-base", echo=lambda s: None)
    # The embedded default (`model: tiny`, the app with no model given) resolves to this same base.
    cache = session_dir / "cache"
    shutil.copytree(path, cache / f"tiny-base-{VERSION}")
    os.environ["OWN_ASSISTANT_CACHE"] = str(cache)
    return path


@pytest.fixture(scope="session")
def identity_files(session_dir) -> dict:
    from trainer.commands.data import main

    out, held = session_dir / "data" / "identity.jsonl", session_dir / "data" / "heldout.jsonl"
    assert main(["--name", NAME, "--author", AUTHOR, "--n", "600", "--out", str(out), "--eval-out", str(held)]) == 0
    return {"train": out, "heldout": held, "name": NAME, "author": AUTHOR}


@pytest.fixture(scope="session")
def tuned_adapter(tiny_base, identity_files, session_dir) -> Path:
    """The `tiny` preset trained on identity data: WORK_DIR/final."""
    from trainer.engine.config import load_config
    from trainer.engine.train import train

    cfg = load_config("tiny", {"model": str(tiny_base), "data": [str(identity_files["train"])],
                               "work_dir": str(session_dir / "work")})
    return train(cfg, echo=lambda s: None)


@pytest.fixture(scope="session")
def merged_model(tiny_base, tuned_adapter, session_dir) -> Path:
    from trainer.export.merge import merge

    return merge(tiny_base, tuned_adapter, session_dir / "merged")


# Multimodal (LLaVA) on tiny real parts, built once per session and shared by tests/test_multimodal.py,
# tests/test_app.py and tests/test_web_demo.py: synthetic shape images, a CLIP-style tower and a chat LLM
# that know them (trainer/multimodal/standins.py), stage pretrain through the CLI, stage finetune, and the
# merged transformers LLaVA export (~70 s on 2 cores in all).
MM_STEPS = {"pretrain": 150, "finetune": 100, "save": 50}      # save: a mid-run checkpoint in both stages
# (test_multimodal.py imports MM_STEPS to find the checkpoints and sample-chat files by step)


@pytest.fixture(scope="session")
def loaded(merged_model):
    """The tiny merged model loaded on the CPU (tests of the serving core)."""
    from inference import load

    return load(merged_model, device="cpu")


@pytest.fixture(scope="session")
def mm_dir(session_dir) -> Path:
    path = session_dir / "mm"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def mm_shapes(mm_dir) -> dict:
    from trainer.multimodal.synthetic import write_shapes

    return write_shapes(mm_dir / "shapes", n=900, heldout=45, size=32, seed=0)


@pytest.fixture(scope="session")
def mm_tower(mm_shapes, mm_dir) -> str:
    from trainer.multimodal.standins import train_tiny_vision

    return str(train_tiny_vision(mm_shapes["captions"], mm_dir / "tiny-clip"))


@pytest.fixture(scope="session")
def mm_llm(mm_shapes, mm_dir) -> Path:
    from trainer.multimodal.standins import build_shapes_llm

    return build_shapes_llm(mm_shapes["caption_text"], mm_dir / "llm")


@pytest.fixture(scope="session")
def mm_pretrained(mm_llm, mm_tower, mm_shapes, mm_dir) -> Path:
    """Stage pretrain through the CLI: only the projector learns, from image-caption pairs."""
    from trainer.__main__ import main as cli

    work = mm_dir / "pretrain"
    assert cli(["mm-train", "llava_tiny_pretrain", "--model", str(mm_llm), "--visual-encoder", mm_tower,
                "--data", str(mm_shapes["captions"]), "--work-dir", str(work),
                "--set", f"max_steps={MM_STEPS['pretrain']}", "--set", "evaluation_inputs=[]",
                "--set", f"save_steps={MM_STEPS['save']}"]) == 0
    return work / "final"


@pytest.fixture(scope="session")
def mm_finetuned(mm_llm, mm_tower, mm_shapes, mm_pretrained, mm_dir) -> Path:
    """Stage finetune: LoRA on the LLM + the pretrained projector, on colour/shape questions."""
    from trainer.multimodal.config import load_mm_config
    from trainer.multimodal.train import train_mm

    cfg = load_mm_config("llava_tiny_finetune", {"model": str(mm_llm), "visual_encoder": mm_tower,
                                                 "data": [str(mm_shapes["questions"])],
                                                 "work_dir": str(mm_dir / "finetune")},
                         [f"max_steps={MM_STEPS['finetune']}", f"pretrained_projector={mm_pretrained}",
                          f"save_steps={MM_STEPS['save']}", "evaluation_images=[images/heldout00000.png]"])
    return train_mm(cfg, echo=lambda s: None)


@pytest.fixture(scope="session")
def mm_merged(mm_finetuned, mm_dir) -> Path:
    """`mm-export --merge`: the finetuned run as one transformers LLaVA dir."""
    from trainer.__main__ import main as cli

    out = mm_dir / "merged"
    assert cli(["mm-export", str(mm_finetuned), str(out), "--merge"]) == 0
    return out


@pytest.fixture(scope="session")
def mm_colour_images(mm_shapes) -> dict:
    """One held-out image per colour (never trained on): {"red": path, "green": path, "blue": path}."""
    from trainer.multimodal.data import read_llava_records
    out = {}
    for rec in read_llava_records(mm_shapes["heldout"]):
        answer = rec["messages"][-1]["content"]              # "It is red." for the colour questions
        colour = answer.removeprefix("It is ").rstrip(".")
        if colour in ("red", "green", "blue"):
            out.setdefault(colour, Path(rec["image"]))
    assert len(out) == 3, out
    return out


@pytest.fixture(scope="module")
def tiny_lora(tiny_base, identity_files):
    """The tiny base with a LoRA adapter (B made non-zero so the adapter matters) and two packed rows:
    (build() -> a fresh model, the same each call; the batch; the tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.engine.dataset import Collator, encode_files, pack

    tok = AutoTokenizer.from_pretrained(tiny_base)
    samples, _ = encode_files([str(identity_files["train"])], tok, 128, None)
    batch = Collator(tok.pad_token_id, packed=True)(pack(samples[:12], 128)[:2])

    def build():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        return model
    return build, batch, tok
