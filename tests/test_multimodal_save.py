"""The LLaVA stages' outputs appear whole or not at all, with a plain write's permissions (inference/atomic.py).

Proves, on a tiny LLaVA assembled from the tiny base and a random tower (no training): mm-train's
final/ is swapped in whole (a save that fails half-way leaves the older final/ and no temp dir), every
file in it is readable like a plain write (not safetensors' / mkdtemp's private 0600 / 0700); the
mm-export adapter dir and the stand-in vision tower likewise; `repeat`'s JSON output has a plain file's
mode. Each failed on the code before issue 16 (temp dir left behind, 0700 / 0600 modes, half a tower).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_multimodal_save.py -q
"""
from __future__ import annotations

import json
import os
import stat
import types

import pytest


@pytest.fixture(scope="module")
def llava(tiny_base):
    from inference.llava_model import build_llava

    return build_llava(str(tiny_base), "tiny")


@pytest.fixture
def plain(tmp_path):
    """(file mode, dir mode) of a plain open/mkdir under this process's umask."""
    f, d = tmp_path / "plain.txt", tmp_path / "plain.d"
    f.write_text("")
    d.mkdir()
    modes = stat.S_IMODE(f.stat().st_mode), stat.S_IMODE(d.stat().st_mode)
    f.unlink()
    d.rmdir()
    return modes


def odd_modes(root, plain) -> dict:
    """Paths under ROOT (itself included) whose mode differs from a plain write's."""
    file_mode, dir_mode = plain
    odd = {}
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (dir_mode if path.is_dir() else file_mode):
            odd[str(path.relative_to(root.parent))] = oct(mode)
    return odd


def save_pretrain_final(model, processor, work, tiny_base):
    from trainer.multimodal.train import save_final

    cfg = types.SimpleNamespace(stage="pretrain", system_prompt="You are Lumi.")   # what save_final reads
    info = {"stage": "pretrain", "base": {"llm": str(tiny_base), "visual_encoder": "tiny"}, "image_tokens": 16}
    return save_final(None, model, processor, cfg, info, work)


class FailingProcessor:
    """Saves the tokenizer files, then the disk is full."""

    def __init__(self, processor):
        self.processor = processor

    def save_pretrained(self, out):
        self.processor.tokenizer.save_pretrained(out)
        raise OSError("No space left on device")


def test_mm_train_final_is_swapped_in_whole_with_plain_modes(llava, tiny_base, tmp_path, plain):
    model, processor = llava
    work = tmp_path / "run"
    work.mkdir()
    final = save_pretrain_final(model, processor, work, tiny_base)
    names = {p.name for p in final.iterdir()}
    assert {"projector.safetensors", "llava.json", "assistant.json", "processor_config.json"} <= names, names
    assert odd_modes(final, plain) == {}
    assert [p.name for p in work.iterdir()] == ["final"]
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    with pytest.raises(OSError, match="No space left"):
        save_pretrain_final(model, FailingProcessor(processor), work, tiny_base)
    assert [p.name for p in work.iterdir()] == ["final"]             # no half-written temp dir beside it
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before   # the older final/ untouched


def test_mm_export_adapter_dir_has_plain_modes(llava, tiny_base, tmp_path, plain):
    from inference.errors import UserError
    from trainer.multimodal.export import export_adapter

    model, processor = llava
    work = tmp_path / "run"
    work.mkdir()
    final = save_pretrain_final(model, processor, work, tiny_base)
    out = export_adapter(final, tmp_path / "out" / "adapter")
    assert {"projector.safetensors", "llava.json", "processor_config.json"} <= {p.name for p in out.iterdir()}
    assert odd_modes(out, plain) == {}
    assert json.loads((out / "llava.json").read_text(encoding="utf-8"))["stage"] == "pretrain"
    with pytest.raises(UserError, match="already exists and is not empty"):
        export_adapter(final, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]


def test_the_stand_in_tower_is_saved_whole(tmp_path, plain, monkeypatch):
    from inference import llava_model
    from trainer.multimodal.standins import train_tiny_vision
    from trainer.multimodal.synthetic import write_shapes

    data = write_shapes(tmp_path / "shapes", n=9, heldout=0, size=32)
    tower = train_tiny_vision(data["captions"], tmp_path / "clip", steps=1)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in tower.iterdir()}
    assert odd_modes(tower, plain) == {}

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    def failing_processor(*args, make=llava_model.make_image_processor, **kwargs):
        processor = make(*args, **kwargs)
        processor.save_pretrained = full_disk             # the tower is saved, then its processor fails
        return processor

    monkeypatch.setattr(llava_model, "make_image_processor", failing_processor)
    with pytest.raises(OSError):
        train_tiny_vision(data["captions"], tmp_path / "clip2", steps=1)
    assert not (tmp_path / "clip2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "shapes"]


def test_repeat_json_has_a_plain_files_mode(tmp_path, plain):
    from trainer.multimodal.repeat import repeat

    src = tmp_path / "unique.jsonl"
    src.write_text(json.dumps({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                                   {"from": "gpt", "value": "red"}]}) + "\n")
    assert repeat(src, tmp_path / "out" / "rep.json", 3) == 3
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "rep.json").st_mode) == plain[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rep.json"]
