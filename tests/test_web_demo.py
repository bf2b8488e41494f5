"""web_demo.py: the Streamlit demo answers through the inference core, alone and side by side.

Proves (Streamlit's AppTest, the real script, tiny real models): the tuned model answers "你是谁"
with its name, the history grows over turns, the clear button empties it, the sidebar shows the
device; in compare mode (`--model BASE --adapter ADAPTER --compare BASE`) one question goes to both
models and each column holds its own answer -- the tuned one has the name, the base one does not;
a missing model dir is a clear error on the page.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

SCRIPT = str(Path(__file__).resolve().parent.parent / "web_demo.py")
NAME = "Lumi"


def run_demo(monkeypatch, *args) -> AppTest:
    # AppTest runs the script in this process: its `streamlit run web_demo.py -- ARGS` arrive via sys.argv.
    monkeypatch.setattr(sys, "argv", ["web_demo.py", *map(str, args)])
    at = AppTest.from_file(SCRIPT, default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    at.sidebar.slider[0].set_value(0.0)          # temperature 0: greedy, so the answer is reproducible
    return at


def answers(container) -> list[str]:
    return [m.markdown[0].value for m in container.chat_message if m.name == "assistant"]


def test_chat_history_and_clear(merged_model, monkeypatch):
    at = run_demo(monkeypatch, "--model", merged_model)
    assert any("CPU (float32)" in c.value for c in at.sidebar.caption)
    at.chat_input[0].set_value("你是谁").run()
    assert not at.exception, at.exception
    assert NAME in answers(at)[0]
    at.chat_input[0].set_value("What is 3 plus 4?").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"] * 2
    at.sidebar.button[0].click().run()
    assert len(at.chat_message) == 0


def test_compare_mode_sends_each_question_to_both(tiny_base, tuned_adapter, monkeypatch):
    at = run_demo(monkeypatch, "--model", tiny_base, "--adapter", tuned_adapter, "--compare", tiny_base)
    at.chat_input[0].set_value("你是谁").run()
    assert not at.exception, at.exception
    tuned, base = at.columns[0], at.columns[1]
    assert "Tuned" in tuned.subheader[0].value and "Base" in base.subheader[0].value
    assert [m.name for m in tuned.chat_message] == ["user", "assistant"] == [m.name for m in base.chat_message]
    assert NAME in answers(tuned)[0]
    assert NAME not in answers(base)[0] and answers(base)[0].strip()


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["web_demo.py", "--model", str(tmp_path / "nope")])
    at = AppTest.from_file(SCRIPT, default_timeout=60).run()
    assert "model directory not found" in at.error[0].value and not at.exception
