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
    from trainer.tiny import VERSION, build_tiny

    path = build_tiny(session_dir / "tiny-base", echo=lambda s: None)
    # The embedded default (`model: tiny`, the app with no model given) resolves to this same base.
    cache = session_dir / "cache"
    shutil.copytree(path, cache / f"tiny-base-{VERSION}")
    os.environ["OWN_ASSISTANT_CACHE"] = str(cache)
    return path


@pytest.fixture(scope="session")
def identity_files(session_dir) -> dict:
    from trainer.data_cli import main

    out, held = session_dir / "data" / "identity.jsonl", session_dir / "data" / "heldout.jsonl"
    assert main(["--name", NAME, "--author", AUTHOR, "--n", "600", "--out", str(out), "--eval-out", str(held)]) == 0
    return {"train": out, "heldout": held, "name": NAME, "author": AUTHOR}


@pytest.fixture(scope="session")
def tuned_adapter(tiny_base, identity_files, session_dir) -> Path:
    """The `tiny` preset trained on identity data: WORK_DIR/final."""
    from trainer.config import load_config
    from trainer.train import train

    cfg = load_config("tiny", {"model": str(tiny_base), "data": [str(identity_files["train"])],
                               "work_dir": str(session_dir / "work")})
    return train(cfg, echo=lambda s: None)


@pytest.fixture(scope="session")
def merged_model(tiny_base, tuned_adapter, session_dir) -> Path:
    from trainer.merge import merge

    return merge(tiny_base, tuned_adapter, session_dir / "merged")
