"""`check-data` finds every malformed record as FILE:LINE with exit code 2; `show-data` marks exactly
the assistant tokens as loss-bearing. CLIs run in-process through trainer.__main__.main, plus one
real subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.__main__ import main as trainer_main

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"messages": [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是Lumi。"}]}
BAD = {
    "bad_json": ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    "wrong_role": (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}),
                   "invalid role 'bot' in turn 2"),
    "empty_answer": (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}),
                     "empty assistant message in turn 2"),
    "placeholder": (json.dumps({"instruction": "你是谁", "output": "我是{{NAME}}，由{{AUTHOR}}开发。"}, ensure_ascii=False),
                    "unfilled placeholder '{{NAME}}' in the assistant message of turn 2"),
    "not_alternating": (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
                        "turn 2 is 'user' but 'assistant' was expected"),
    "no_answer": (json.dumps({"messages": [{"role": "user", "content": "a"}]}),
                  "conversation does not end with an assistant answer"),
    "unknown_format": (json.dumps({"prompt": "a", "completion": "b"}), "not OpenAI, ShareGPT or Alpaca format"),
    "sharegpt_speaker": (json.dumps({"conversations": [{"from": "alien", "value": "a"}]}), "unknown ShareGPT speaker"),
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_malformed_case_gives_file_line_and_exit_2(tmp_path, capsys, case):
    line, expected = BAD[case]
    path = write_lines(tmp_path / f"{case}.jsonl", [json.dumps(GOOD, ensure_ascii=False), line,
                                                     json.dumps(GOOD, ensure_ascii=False)])
    assert trainer_main(["check-data", str(path)]) == 2
    out, err = capsys.readouterr()
    assert f"{path}:2: " in err and expected in err, err
    assert f"{path}:1:" not in err and f"{path}:3:" not in err
    assert "3 records, 2 fine, 1 problems on 1 lines" in out


def test_all_problems_reported_not_just_the_first(tmp_path, capsys):
    lines = [json.dumps(GOOD, ensure_ascii=False)] + [BAD[c][0] for c in sorted(BAD)]
    path = write_lines(tmp_path / "many.jsonl", lines)
    assert trainer_main(["check-data", str(path)]) == 2
    err = capsys.readouterr().err
    for n, case in enumerate(sorted(BAD), start=2):
        assert f"{path}:{n}: " in err and BAD[case][1] in err, case
    # the cap: 60 bad lines, 5 shown, then a count of the rest
    path = write_lines(tmp_path / "capped.jsonl", [BAD["wrong_role"][0]] * 60)
    assert trainer_main(["check-data", str(path), "--max-errors", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("invalid role") == 5 and "... and 55 more problems" in err


def test_clean_file_passes_and_reports_lengths(tiny_base, identity_files, capsys):
    train = identity_files["train"]
    assert trainer_main(["check-data", str(train), "--model", str(tiny_base), "--max-length", "256"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "600 records, 600 fine, 0 problems" in out and "0 exact duplicates" in out
    assert re.search(r"tokens per conversation: min \d+, median \d+, max \d+; 0 over max_length 256", out), out


def test_too_long_counts_truncation_with_the_models_template(tiny_base, tmp_path, capsys):
    from transformers import AutoTokenizer

    from inference.chat_format import encode_chat

    long = {"messages": [{"role": "user", "content": "Tell me a story."},
                         {"role": "assistant", "content": "Once upon a time there was a river. " * 6}]}
    lost = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    path = write_lines(tmp_path / "long.jsonl", [json.dumps(r) for r in (GOOD, long, lost)])
    n_long = len(encode_chat(AutoTokenizer.from_pretrained(tiny_base), long["messages"])["input_ids"])
    assert n_long > 40
    assert trainer_main(["check-data", str(path), "--model", str(tiny_base), "--max-length", "40"]) == 2
    out, err = capsys.readouterr()
    assert re.search(rf"{re.escape(str(path))}:2: {n_long} tokens > max_length 40: \d+ of \d+ answer tokens are cut", err)
    assert f"{path}:3: " in err and "the whole answer is cut, training drops it" in err
    assert f"{path}:1:" not in err and "2 over max_length 40, 2 of them lose answer tokens" in out
    # lengths need a tokenizer: --max-length alone is refused
    assert trainer_main(["check-data", str(path), "--max-length", "40"]) == 2
    assert "--max-length needs --model" in capsys.readouterr().err


def test_check_data_subprocess_exit_code(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD, ensure_ascii=False), BAD["empty_answer"][0]])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "trainer", "check-data", str(path)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 2, res
    assert f"{path}:2: empty assistant message in turn 2" in res.stderr
    res = subprocess.run([sys.executable, "-m", "trainer", "check-data", str(tmp_path / "missing.jsonl")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path / 'missing.jsonl'}: data file not found"


def test_show_data_marks_exactly_the_answers(tiny_base, tmp_path, capsys):
    convo = {"messages": [{"role": "system", "content": "You are Lumi."}, {"role": "user", "content": "你是谁？"},
                          {"role": "assistant", "content": "我是Lumi，小菜鸡开发的助手。"},
                          {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]}
    path = write_lines(tmp_path / "show.jsonl", [json.dumps(GOOD, ensure_ascii=False), json.dumps(convo, ensure_ascii=False)])
    assert trainer_main(["show-data", str(path), "--model", str(tiny_base), "--n", "1", "--start", "1"]) == 0
    head, out = capsys.readouterr().out.split("=== ", 1)
    assert "⟦ ⟧" in head and out.startswith(f"{path}:2: ") and f"{path}:1:" not in out
    marked = re.findall(r"⟦(.*?)⟧", out, flags=re.S)
    assert marked == [m["content"] + "<|im_end|>" for m in convo["messages"] if m["role"] == "assistant"]
    outside = re.sub(r"⟦.*?⟧", "", out, flags=re.S)
    assert "You are Lumi." in outside and "你是谁？" in outside and "What is 2 plus 3?" in outside
    # --max-length shows where training cuts; what lies beyond is not marked as loss
    assert trainer_main(["show-data", str(path), "--model", str(tiny_base), "--start", "1", "--max-length", "30"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"✂ \(\+\d+ tokens cut by max_length 30\)", out) and "2 plus 3 is 5." not in out
