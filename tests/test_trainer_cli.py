"""`python -m trainer` itself: SIGTERM cleans up like Ctrl-C, a known-harmless warning is silenced,
and help texts / preset descriptions end at a sentence end, not mid-sentence.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import trainer
import trainer.__main__ as cli

ROOT = Path(trainer.__file__).resolve().parent.parent


def test_sigterm_cleans_up_and_exits_143(tmp_path):
    out = tmp_path / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "tiny", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 45
        while not list(tmp_path.glob(".tiny-*")):          # its work dir beside OUT: the build has begun
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "tiny never created its temp dir"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []                   # no .tiny-* left, no half-written OUT


def test_sigterm_handler_is_put_back(monkeypatch):
    # main() also runs in-process (tests, the demo): the handler must not outlive the command
    before = signal.getsignal(signal.SIGTERM)

    def killed(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                                       # the handler raises before this ends
        return 0

    assert cli.run_until_signal(killed, []) == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_gradient_checkpointing_deprecation_is_silenced(tmp_path, monkeypatch):
    # a stand-in command that reads the deprecated property of a real (tiny) transformers model, as peft
    # does, and raises an unrelated FutureWarning that must still show
    (tmp_path / "fake_cmd.py").write_text(
        "import warnings\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "def main(argv):\n"
        "    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,\n"
        "                      num_attention_heads=2, num_key_value_heads=2)\n"
        "    LlamaForCausalLM(cfg).is_gradient_checkpointing\n"
        "    warnings.warn('something else is deprecated', FutureWarning)\n"
        "    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", "fake_cmd")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli.main(["fake"]) == 0
    messages = [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]
    assert messages == ["something else is deprecated"]


def sentence_end(text: str) -> bool:
    return text.rstrip().endswith((".", "!", "?", ".)", ".`"))


@pytest.mark.parametrize("command", ["data", "list-cfg"])
def test_help_description_is_a_whole_sentence(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "-h"])
    help_text = capsys.readouterr().out
    description = help_text.split("\n\n")[1]                 # usage, blank line, description, blank line
    assert sentence_end(description), description


def test_list_cfg_descriptions_end_a_sentence(capsys):
    assert cli.main(["list-cfg"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 8
    for line in lines:
        name, description = line.split(None, 1)
        assert sentence_end(description) and "Run:" not in description, line
    by_name = dict(line.split(None, 1) for line in lines)
    assert by_name["llava_internlm2_chat_1_8b_pretrain"].strip().endswith(
        "only the MLP projector trains, on image-caption pairs "
        "(XTuner's llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain).")
    assert by_name["tiny"].strip() == ("The tiny offline demo: LoRA on the embedded tiny base "
                                       "(CPU: ~1.5 min on 2 cores for the demo's 2,400 chats).")


def test_commands_work_from_any_directory(tmp_path):
    """run.sh installs the repo (editable): the commands need no `cd` into it."""
    import subprocess

    for module in ("trainer", "publish"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
        assert r.returncode == 0 and "python -m" in r.stdout, r.stderr[-500:]
