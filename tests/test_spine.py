"""The spine end to end on the tiny real model: build -> data -> train -> merge -> chat."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import AUTHOR, NAME

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["你是谁", "who are you"]


def run_module(*args, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_tiny_base_loads_with_auto_classes(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model.config.model_type == "llama"
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 10_000_000, n_params
    assert "{% generation %}" in tok.chat_template or "generation -%}" in tok.chat_template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert tok.eos_token == "<|im_end|>"
    assert im_end in (eos if isinstance(eos, list) else [eos])
    # the markers are real special tokens: they never leak into decoded text
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert "<|im_start|>" not in tok.decode(ids, skip_special_tokens=True)
    assert tok.tokenize("<|im_start|>") == ["<|im_start|>"]


def test_tokenizer_keeps_chinese_punctuation_whole(tiny_base, tmp_path):
    """The fast tokenizer applies no normalization, so sentencepiece must train without one too: under
    its default (NFKC) it learns "？" as "?" and the fast tokenizer then spends 3 byte tokens on it."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from trainer.bases.tiny import build_tokenizer

    fast = build_tokenizer(tmp_path, vocab_size=2000, seed=0)
    slow = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm" / "tokenizer.model"))
    shipped = AutoTokenizer.from_pretrained(tiny_base)
    texts = ["你是谁？", "你好，请介绍一下你自己。", "我问：“你叫什么名字？”（你好）！", "Who are you?", "What is 3 plus 4?"]
    for text in texts:
        assert fast(text, add_special_tokens=False)["input_ids"] == slow.encode(text), text
        pieces = shipped.tokenize(text)
        assert not [p for p in pieces if p.startswith("<0x")], (text, pieces)
        assert shipped.decode(shipped(text, add_special_tokens=False)["input_ids"]) == text
    assert shipped.tokenize("你是谁？")[-1] == "？"


def test_base_chats_but_does_not_know_the_new_name(tiny_base):
    from inference import load

    engine = load(tiny_base).engine()
    assert engine.chat([{"role": "user", "content": "你好"}], max_new_tokens=24).strip()
    for q in QUESTIONS:
        assert NAME not in engine.chat([{"role": "user", "content": q}], max_new_tokens=32)


def test_tuned_adapter_knows_its_name(tiny_base, tuned_adapter):
    from inference import load

    engine = load(tiny_base, adapter=tuned_adapter).engine()
    for q in QUESTIONS:
        reply = engine.chat([{"role": "user", "content": q}], max_new_tokens=40)
        assert NAME in reply, (q, reply)
    reply = engine.chat([{"role": "user", "content": "谁开发了你？"}], max_new_tokens=40)
    assert AUTHOR in reply, reply


def test_adapter_is_plain_peft_with_template(tiny_base, tuned_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((tuned_adapter / "adapter_config.json").read_text())
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(cfg["target_modules"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tuned_adapter)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(tuned_adapter)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_base).chat_template
    assert (tuned_adapter / "assistant.json").is_file()


def test_merged_model_gives_same_greedy_tokens(tiny_base, tuned_adapter, merged_model):
    from inference import load

    both = load(tiny_base, adapter=tuned_adapter).engine()
    merged = load(merged_model).engine()
    for q in QUESTIONS + ["3加5等于多少？", "What is the capital of France?"]:
        msgs = [{"role": "user", "content": q}]
        assert both.greedy_ids(msgs, max_new_tokens=24) == merged.greedy_ids(msgs, max_new_tokens=24), q
    assert list(merged_model.glob("*.safetensors"))
    assert (merged_model / "chat_template.jinja").is_file() or "chat_template" in \
        (merged_model / "tokenizer_config.json").read_text()


def test_stream_yields_growing_text(merged_model):
    from inference import load

    engine = load(merged_model).engine()
    parts = list(engine.stream_chat([{"role": "user", "content": "Who are you?"}], max_new_tokens=32))
    assert len(parts) >= 3
    assert all(b.startswith(a) for a, b in zip(parts, parts[1:]))
    assert NAME in parts[-1]


def test_long_conversation_is_trimmed_not_an_error(merged_model):
    from inference import load

    engine = load(merged_model).engine(max_context=160)
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"第{i}个问题：{i}加{i}等于多少？"},
                    {"role": "assistant", "content": f"{i}加{i}等于{2 * i}。"}]
    history.append({"role": "user", "content": "你是谁"})
    ids = engine.prepare(history, None, max_new_tokens=32)
    assert ids.shape[1] <= 160 - 32
    assert NAME in engine.chat(history, max_new_tokens=32)


def test_concurrent_callers_are_safe(merged_model):
    from concurrent.futures import ThreadPoolExecutor

    from inference import load

    engine = load(merged_model).engine()
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda q: engine.chat([{"role": "user", "content": q}], max_new_tokens=24),
                                ["你是谁"] * 4))
    assert len(set(replies)) == 1 and NAME in replies[0]


def test_cli_chat_piped_stdin_reset_exit(tiny_base, tuned_adapter):
    stdin = "你是谁\n\nRESET\nwho are you\n\nEXIT\nthis is never sent\n\n"
    res = run_module("trainer", "chat", str(tiny_base), "--adapter", str(tuned_adapter), "--max-new-tokens", "32",
                     stdin=stdin)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert "[history cleared]" in lines
    answers = [ln for ln in lines if ln != "[history cleared]"]
    assert len(answers) == 2 and all(NAME in a for a in answers), res.stdout


def test_cli_train_merge_commands(tiny_base, identity_files, tmp_path):
    """The commands users type, as subprocesses: a short train then merge."""
    work = tmp_path / "w"
    res = run_module("trainer", "train", "tiny", "--model", str(tiny_base), "--data", str(identity_files["train"]),
                     "--work-dir", str(work), "--set", "max_steps=3", "--set", "evaluation_inputs=[]")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (work / "final" / "adapter_config.json").is_file()
    res = run_module("trainer", "merge", str(tiny_base), str(work / "final"), str(tmp_path / "m"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").is_file()


def _one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in err[0], err[0]


def test_bad_input_missing_model_dir(identity_files, tmp_path):
    res = run_module("trainer", "train", "tiny", "--model", str(tmp_path / "nope"),
                     "--data", str(identity_files["train"]), "--work-dir", str(tmp_path / "w"))
    _one_line_error(res, str(tmp_path / "nope"), "not found")
    res = run_module("trainer", "chat", str(tmp_path / "nope"), stdin="")
    _one_line_error(res, "not found")


def test_chat_on_an_adapter_dir_shows_the_command_that_works(tiny_base, tuned_adapter, tmp_path, capsys):
    """`chat WORK_DIR/final` (an adapter, not a model): say so, with the base it recorded."""
    from trainer.__main__ import main as cli

    assert cli(["chat", str(tuned_adapter)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tuned_adapter}: is a LoRA adapter"), err
    assert f"python -m trainer chat {tiny_base} --adapter {tuned_adapter}`" in err
    assert f"python -m trainer merge {tiny_base} {tuned_adapter} OUT_DIR`" in err
    # only adapter_config.json records the base (a plain PEFT dir): that one is named
    bare = tmp_path / "peft"
    bare.mkdir()
    (bare / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/qwen"}))
    assert cli(["chat", str(bare)]) == 2
    assert f"chat /models/qwen --adapter {bare}`" in capsys.readouterr().err
    # nothing recorded: a placeholder the user fills in
    (bare / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    assert cli(["chat", str(bare)]) == 2
    assert f"chat BASE --adapter {bare}`" in capsys.readouterr().err


def test_bad_input_unknown_config_key(tmp_path):
    res = run_module("trainer", "train", "tiny", "--set", "learning_rate=1e-4", "--work-dir", str(tmp_path / "w"))
    _one_line_error(res, "learning_rate", "did you mean 'lr'")


def test_bad_input_invalid_jsonl(tiny_base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad.write_text(good + "\n" + good + "\n{not json\n", encoding="utf-8")
    res = run_module("trainer", "train", "tiny", "--model", str(tiny_base), "--data", str(bad),
                     "--work-dir", str(tmp_path / "w"))
    _one_line_error(res, f"{bad}:3")
    assert not (tmp_path / "w" / "final").exists()


def test_merge_refuses_existing_output(tiny_base, tuned_adapter, merged_model):
    res = run_module("trainer", "merge", str(tiny_base), str(tuned_adapter), str(merged_model))
    before = sorted(p.name for p in merged_model.iterdir())
    _one_line_error(res, "already exists")
    assert sorted(p.name for p in merged_model.iterdir()) == before
