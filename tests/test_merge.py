"""Merge (extends the spine's): a QLoRA adapter merges into the full-precision base, a quantized base
is refused, remote-code files are copied, shards honour --max-shard-size, and an adapter of another
base model is a one-line error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from inference.errors import UserError
from trainer.export.merge import merge


@pytest.fixture(scope="module")
def qlora_adapter(tiny_base, identity_files, tmp_path_factory) -> Path:
    from trainer.engine.config import load_config
    from trainer.engine.train import train

    work = tmp_path_factory.mktemp("merge") / "run"
    cfg = load_config("tiny", {"model": str(tiny_base), "data": [str(identity_files["train"])], "work_dir": str(work)},
                      ["bits=4", "max_steps=3", "batch_size=4", "max_length=128", "evaluation_inputs=[]"])
    return train(cfg, echo=lambda s: None)


def test_qlora_adapter_merges_into_full_precision_base(tiny_base, qlora_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    said = []
    out = merge(tiny_base, qlora_adapter, tmp_path / "merged", echo=said.append)
    assert any("4-bit" in s for s in said)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    ids = torch.tensor([[1, 5, 60, 200, 7, 300, 9]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), qlora_adapter)(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_base)(input_ids=ids).logits
    torch.testing.assert_close(merged, peft, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged, plain)


def test_quantized_base_is_refused(tiny_base, qlora_adapter, tmp_path):
    quantized = tmp_path / "base-4bit"
    shutil.copytree(tiny_base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="bitsandbytes quantized checkpoint.*original bf16/fp32 base"):
        merge(quantized, qlora_adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_remote_code_copied_and_shards_honoured(tiny_base, qlora_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "modeling_custom.py").write_text("# the base model's remote code\n")
    out = merge(base, qlora_adapter, tmp_path / "merged", max_shard_size="1MB")
    assert (out / "modeling_custom.py").read_text() == "# the base model's remote code\n"
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    AutoModelForCausalLM.from_pretrained(out)


def test_adapter_of_another_base_is_a_one_line_error(tiny_base, qlora_adapter, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.__main__ import main as cli

    other = tmp_path / "other"
    cfg = json.loads((tiny_base / "config.json").read_text())
    LlamaForCausalLM(LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(other)
    capsys.readouterr()                                   # drop save_pretrained's progress bar
    assert cli(["merge", str(other), str(qlora_adapter), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not fit the base model" in err
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_assistant_file_is_portable_and_still_read(tiny_base, qlora_adapter, tmp_path, monkeypatch):
    """A merged model is published: assistant.json must not carry the trainer's home path, and what
    reads it (system prompt for chat, base model for eval) must keep working on this machine."""
    from inference import load
    from inference.assistant_file import portable_path, read_assistant_file
    from trainer.commands.eval import resolve_base

    home = tmp_path / "home" / "alice"
    base, adapter = home / "models" / "base", home / "runs" / "lumi" / "final"
    shutil.copytree(tiny_base, base)
    shutil.copytree(qlora_adapter, adapter)
    monkeypatch.setenv("HOME", str(home))
    out = merge(base, adapter, home / "merged")

    stored = json.loads((out / "assistant.json").read_text(encoding="utf-8"))
    assert stored["base_model"] == "~/models/base" and stored["adapter"] == "~/runs/lumi/final"
    leaks = [f.name for f in out.iterdir() if f.suffix in (".json", ".jinja") and str(home) in f.read_text("utf-8")]
    assert not leaks, leaks
    info = read_assistant_file(out)
    assert Path(info["base_model"]) == base and Path(info["adapter"]) == adapter
    assert info["system_prompt"] == read_assistant_file(adapter)["system_prompt"] == load(out).system_prompt
    assert resolve_base(None, out, required=False) == base
    # inside the model dir -> relative; a hub id or an unrelated path -> as given
    assert portable_path(out / "extra" / "x.bin", out) == "./extra/x.bin"
    assert portable_path("Qwen/Qwen2-0.5B", out) == "Qwen/Qwen2-0.5B"
    assert portable_path("/opt/models/base", out) == "/opt/models/base"


def test_merge_onto_another_base_of_the_same_shape_warns(tiny_base, tuned_adapter, tmp_path, capsys):
    """Same shape, other weights: PEFT loads it without complaint and the answers are garbage, so the
    base the adapter recorded is named. A copy of the right base, or a recorded path missing on this
    machine (trained elsewhere), is not a reason to warn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.__main__ import main as cli

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(other)
    capsys.readouterr()
    assert cli(["merge", str(other), str(tuned_adapter), str(tmp_path / "m1")]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert f"{tuned_adapter} was trained on {tiny_base}" in warnings[0] and f"BASE is {other}" in warnings[0]
    assert (tmp_path / "m1" / "config.json").is_file()                    # a warning, not a failure

    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    for base, out in ((tiny_base, "m2"), (copy, "m3")):
        assert cli(["merge", str(base), str(tuned_adapter), str(tmp_path / out)]) == 0
        assert "warning:" not in capsys.readouterr().err

    moved = tmp_path / "adapter-from-elsewhere"
    shutil.copytree(tuned_adapter, moved)
    for name, key in (("assistant.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        data = json.loads((moved / name).read_text(encoding="utf-8"))
        data[key] = "/home/someone-else/models/tiny-base"
        (moved / name).write_text(json.dumps(data), encoding="utf-8")
    assert cli(["merge", str(other), str(moved), str(tmp_path / "m4")]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_train_merge_to_writes_what_merge_writes(tiny_base, identity_files, tmp_path):
    """`train --merge-to OUT` merges in the training process: the same weights as `merge` of WORK_DIR/final."""
    from safetensors.torch import load_file

    from trainer.commands.train import main as train_main

    work, out = tmp_path / "work", tmp_path / "merged"
    assert train_main(["tiny", "--model", str(tiny_base), "--data", str(identity_files["train"]),
                       "--work-dir", str(work), "--set", "max_steps=6", "--set", "save_steps=0",
                       "--set", "evaluation_inputs=[]", "--merge-to", str(out)]) == 0
    separate = merge(tiny_base, work / "final", tmp_path / "separate")
    got, want = load_file(out / "model.safetensors"), load_file(separate / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    base = load_file(Path(tiny_base) / "model.safetensors")
    assert any(not torch.equal(got[k], base[k]) for k in base)        # the adapter's update is in it
    assert json.loads((out / "assistant.json").read_text())["adapter"] == str(work / "final")


def test_train_merge_to_refuses_before_training(tiny_base, identity_files, tmp_path):
    from trainer.commands.train import main as train_main

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    common = ["--model", str(tiny_base), "--data", str(identity_files["train"]), "--set", "max_steps=2"]
    with pytest.raises(UserError, match="already exists and is not empty"):
        train_main(["tiny", *common, "--work-dir", str(tmp_path / "w1"), "--merge-to", str(taken)])
    with pytest.raises(UserError, match="writes a full model already"):
        train_main(["tiny", *common, "--work-dir", str(tmp_path / "w2"), "--set", "method=full",
                    "--merge-to", str(tmp_path / "new")])
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()     # nothing trained, nothing written
    assert (taken / "keep.txt").read_text() == "mine"
