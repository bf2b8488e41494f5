"""Presets and config checking: every shipped preset validates, list-cfg / copy-cfg work, and bad
configs fail with one line that names the file (and line) or flag and what to do."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from trainer.__main__ import main as cli
from trainer.engine.config import FIELDS, PRESET_DIR, TrainConfig, load_config, preset_command, preset_names
from inference.errors import UserError

COURSE_QUESTIONS = ["请你介绍一下你自己", "你是谁", "你是我的小助手吗"]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_presets_shipped():
    assert {"tiny", "internlm2_chat_1_8b_qlora", "qwen2_5_1_5b_instruct_qlora", "llama3_2_1b_instruct_lora"} <= set(preset_names())


def loader_for(command: str):
    """Each preset is validated by the config loader of the command its header names."""
    if command == "train":
        return load_config
    if command == "mm-train":
        from trainer.multimodal.config import load_mm_config

        return load_mm_config
    raise AssertionError(f"preset names an unknown command {command!r}")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates_and_documents_itself(name):
    command = preset_command(PRESET_DIR / f"{name}.yaml")
    assert command, "the header must say how to run it (# Run: python -m trainer COMMAND ...)"
    cfg = loader_for(command)(name)
    assert isinstance(cfg, TrainConfig)
    assert cfg.evaluation_inputs, "every preset shows sample chats while training"
    # round trip through the dataclass: nothing in the file is dropped or renamed
    assert type(cfg)(**dataclasses.asdict(cfg)) == cfg


def test_train_refuses_a_preset_of_another_command(capsys):
    others = [n for n in preset_names() if preset_command(PRESET_DIR / f"{n}.yaml") != "train"]
    if not others:
        pytest.skip("all shipped presets are for `train`")
    rc, _, err = run(capsys, "train", others[0])
    assert rc == 2 and "this preset is for `python -m trainer" in err


def test_course_preset_is_the_course_run():
    cfg = load_config("internlm2_chat_1_8b_qlora")
    assert (cfg.max_length, cfg.epochs, cfg.lr, cfg.lora_r, cfg.lora_alpha) == (1024, 2, 2e-4, 64, 16)
    assert (cfg.bits, cfg.dtype, cfg.method) == (4, "bf16", "lora")
    assert cfg.evaluation_freq == 300 and cfg.evaluation_inputs == COURSE_QUESTIONS
    assert cfg.batch_size * cfg.grad_accum == 16


def test_every_field_is_documented():
    source = Path(__import__("trainer.engine.config", fromlist=["x"]).__file__).read_text(encoding="utf-8")
    for name in FIELDS:
        line = next(line for line in source.splitlines() if re.match(rf"\s+{name}: ", line))
        assert "#" in line, f"field {name} has no comment"


def test_list_cfg_and_copy_cfg(capsys, tmp_path):
    rc, out, _ = run(capsys, "list-cfg")
    assert rc == 0 and all(name in out for name in preset_names())
    rc, out, _ = run(capsys, "list-cfg", "-p", "internlm2")
    assert rc == 0 and out.split()[0] == "internlm2_chat_1_8b_qlora" and "tiny" not in out.split()
    rc, _, err = run(capsys, "list-cfg", "-p", "nothing-like-this")
    assert rc == 2 and err.startswith("error:")
    rc, out, _ = run(capsys, "copy-cfg", "internlm2_chat_1_8b_qlora", str(tmp_path / "cfg"))
    copy = tmp_path / "cfg" / "internlm2_chat_1_8b_qlora_copy.yaml"
    assert rc == 0 and copy.is_file()
    assert load_config(str(copy)) == load_config("internlm2_chat_1_8b_qlora")
    rc, _, err = run(capsys, "copy-cfg", "internlm2_chat_1_8b_qlora", str(tmp_path / "cfg"))
    assert rc == 2 and "already exists" in err       # never overwrites an edited copy


def test_set_overrides_and_types():
    cfg = load_config("tiny", sets=["lr=2e-4", "epochs=1", "bits=4", "packing=auto", "system_prompt=You are Lumi.",
                                    "evaluation_inputs=[a, b]", "data=x.jsonl"])
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float) and cfg.epochs == 1.0 and cfg.bits == 4
    assert cfg.packing == "auto" and cfg.system_prompt == "You are Lumi."
    assert cfg.evaluation_inputs == ["a", "b"] and cfg.data == ["x.jsonl"]
    assert load_config("tiny", sets=["bits=none"]).bits is None
    assert load_config("tiny", sets=["bits=auto", "memory_budget_gib=40"]).bits == "auto"
    assert load_config("tiny", sets=["bits=AUTO"]).bits == "auto" and load_config("tiny", sets=["bits='4'"]).bits == 4


def test_bits_auto_picks_bf16_lora_when_the_weights_fit_the_budget():
    from trainer.engine.config import resolve_bits

    b = 10**9
    assert resolve_bits("cuda", int(1.9 * b), 24)[0] is None        # InternLM2-1.8B: 3.5 GiB of bf16 weights
    bits, why = resolve_bits("cuda", int(7.6 * b), 24)                 # Qwen2.5-7B: 14.2 GiB > half of 24
    assert bits == 4 and "4-bit" in why and "24 GiB" in why
    assert resolve_bits("cuda", int(7.6 * b), 40)[0] is None          # a bigger budget: bf16
    assert resolve_bits("cuda", int(6.4 * b), 24)[0] is None          # 11.9 GiB: just fits
    assert resolve_bits("cuda", int(6.5 * b), 24)[0] == 4             # 12.1 GiB: just does not
    assert resolve_bits("cpu", 70 * b, 24)[0] is None                 # never 4-bit on the CPU


def test_yaml_number_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nlr: 2e-4\n", encoding="utf-8")   # YAML 1.1 reads this as a string
    assert load_config(str(path)).lr == 2e-4


@pytest.mark.parametrize("argv,pattern", [
    (["train", "internlm2_chat_1_8b_qlor"], r"unknown preset 'internlm2_chat_1_8b_qlor' -- did you mean 'internlm2_chat_1_8b_qlora'"),
    (["train", "tiny", "--set", "lerning_rate=1e-4"], r"--set: unknown config key 'lerning_rate'"),
    (["train", "tiny", "--set", "lora_rank=8"], r"did you mean 'lora_r'"),
    (["train", "tiny", "--set", "lr=fast"], r"--set lr: lr must be a number"),
    (["train", "tiny", "--set", "lr_scheduler=cosin"], r"did you mean 'cosine'"),
    (["train", "tiny", "--set", "bits=3"], r"bits must be 4, 8, auto or none"),
    (["train", "tiny", "--set", "method=full", "--bits", "4"], r"bits 4 needs method lora"),
    (["train", "tiny", "--set", "method=full", "--bits", "auto"], r"bits auto needs method lora"),
    (["train", "tiny", "--set", "memory_budget_gib=0"], r"memory_budget_gib must be > 0"),
])
def test_bad_config_is_one_line_error(capsys, argv, pattern):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and re.search(pattern, err), err


def test_bad_yaml_file_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("model: tiny\nepochs: 2\nlora_alpah: 16\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}:3: unknown config key 'lora_alpah' -- did you mean 'lora_alpha'"):
        load_config(str(path))
    # the line comes from the YAML parser, not a text search: comments, a quoted key, a value that
    # mentions the key on an earlier line
    path.write_text("# my run\nmodel: tiny\nsystem_prompt: 'lerning_rate: is not a key'\n\n"
                    "\"lerning_rate\": 1e-4\n", encoding="utf-8")
    rc, _, err = run(capsys, "train", str(path))
    assert rc == 2 and err == f"error: {path}:5: unknown config key 'lerning_rate' -- did you mean 'lr'?\n", err
    path.write_text("model: tiny\nepochs: 2\nlora_dropout: 1.5\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}:3: lora_dropout must be in"):
        load_config(str(path))
    path.write_text("model: tiny\nepochs: [1\n", encoding="utf-8")
    rc, _, err = run(capsys, "train", str(path))
    assert rc == 2 and f"{path}:" in err and "invalid YAML" in err
