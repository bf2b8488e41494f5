"""`python -m trainer convert`: a training checkpoint becomes a clean adapter dir that plain PEFT loads,
with the tokenizer, chat template and the system prompt used in training."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer.__main__ import main as cli

SYSTEM = "You are Lumi, made by 小菜鸡."


@pytest.fixture(scope="module")
def run_dir(tiny_base, identity_files, tmp_path_factory) -> Path:
    """4 steps, a checkpoint every 2, with a system prompt."""
    from trainer.engine.config import load_config
    from trainer.engine.train import train

    work = tmp_path_factory.mktemp("convert") / "run"
    cfg = load_config("tiny", {"model": str(tiny_base), "data": [str(identity_files["train"])], "work_dir": str(work)},
                      ["max_steps=4", "save_steps=2", "batch_size=4", "max_length=128", "evaluation_inputs=[]",
                       f"system_prompt={SYSTEM}"])
    train(cfg, echo=lambda s: None)
    return work


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_checkpoint_converts_to_a_clean_adapter_plain_peft_loads(tiny_base, run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference import load

    ckpt, out = run_dir / "checkpoint-2", tmp_path / "adapter"
    assert cli(["convert", str(ckpt), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                              "tokenizer_config.json", "chat_template.jinja", "assistant.json"}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base)
    info = json.loads((out / "assistant.json").read_text(encoding="utf-8"))
    assert info["system_prompt"] == SYSTEM and info["method"] == "lora"

    ids = torch.tensor([[1, 5, 60, 200, 7, 300, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    before = logits(base, ids)
    clean = PeftModel.from_pretrained(base, out).eval()                 # plain PEFT, nothing of ours
    from_ckpt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), ckpt).eval()
    torch.testing.assert_close(logits(clean, ids), logits(from_ckpt, ids))
    assert not torch.allclose(logits(clean, ids), before)                # the adapter does something
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_base).chat_template
    assert load(tiny_base, adapter=out).system_prompt == SYSTEM          # serving uses the training prompt


def test_work_dir_converts_its_newest_complete_checkpoint(run_dir, tmp_path):
    out = tmp_path / "adapter"
    assert cli(["convert", str(run_dir), str(out)]) == 0
    assert json.loads((out / "assistant.json").read_text())["source_checkpoint"] == str(run_dir / "checkpoint-4")


def test_bad_inputs_are_one_line_errors(run_dir, tmp_path, capsys):
    def error(*argv):
        assert cli(["convert", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "not found" in error(str(tmp_path / "nope"), str(tmp_path / "a"))
    torn = tmp_path / "checkpoint-9"
    shutil.copytree(run_dir / "checkpoint-4", torn)
    (torn / "adapter_model.safetensors").write_bytes(b"cut short")
    assert "incomplete checkpoint" in error(str(torn), str(tmp_path / "b"))
    (tmp_path / "empty").mkdir()
    assert "not a checkpoint" in error(str(tmp_path / "empty"), str(tmp_path / "c"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in error(str(run_dir / "checkpoint-4"), str(tmp_path / "full"))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no temp dir left behind
