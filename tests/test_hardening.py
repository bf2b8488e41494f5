"""No run or file is lost and bad files give one line: a finished run is not replaced without
--overwrite, a torn scalars.jsonl line is skipped with a warning (resume and the plot go on), a corrupt
adapter_config.json is named in one line by merge and eval, `demo --fresh` deletes only its own dir."""
from __future__ import annotations

import json
import shutil

from inference.errors import run_cli
from trainer.__main__ import main as cli


def test_train_refuses_to_replace_a_finished_run(tiny_base, identity_files, tmp_path, capsys):
    work = tmp_path / "run"
    (work / "final").mkdir(parents=True)
    (work / "final" / "keep.txt").write_text("an earlier run's adapter")
    (work / "scalars.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    argv = ["train", "tiny", "--model", str(tiny_base), "--data", str(identity_files["train"]),
            "--work-dir", str(work), "--set", "max_steps=2"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and str(work) in err[0]
    assert (work / "final" / "keep.txt").is_file() and "loss" in (work / "scalars.jsonl").read_text()
    assert cli(argv + ["--overwrite"]) == 0
    assert not (work / "final" / "keep.txt").exists() and (work / "final" / "adapter_config.json").is_file()


def test_a_torn_scalars_line_is_skipped_with_a_warning(tmp_path):
    from trainer.engine.checkpoints import forget_after
    from trainer.engine.plot import plot_loss
    from trainer.workdir import read_scalars

    path = tmp_path / "scalars.jsonl"
    path.write_text('{"step": 10, "loss": 2.0, "lr": 0.1}\n{"step": 20, "loss": 1.5, "lr": 0.1}\n{"step": 30, "lo')
    warned = []
    assert [r["step"] for r in read_scalars(tmp_path, warn=warned.append)] == [10, 20]
    assert len(warned) == 1 and f"{path}:3:" in warned[0]
    assert plot_loss(tmp_path).is_file()
    forget_after(tmp_path, 10)                     # what --resume from checkpoint-10 does
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10]


def test_a_corrupt_adapter_config_is_one_line(tiny_base, tuned_adapter, identity_files, tmp_path, capsys):
    broken = tmp_path / "adapter"
    shutil.copytree(tuned_adapter, broken)
    (broken / "adapter_config.json").write_text('{"r": 16, ')
    assert cli(["merge", str(tiny_base), str(broken), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter_config.json: not valid JSON" in err[0], err
    assert not (tmp_path / "merged").exists()
    assert cli(["eval", str(broken), "--eval-data", str(identity_files["heldout"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter_config.json: not valid JSON" in err[0], err


def test_demo_fresh_deletes_only_a_dir_it_created(tmp_path, capsys):
    from trainer.commands.demo import main as demo

    mine = tmp_path / "important"
    mine.mkdir()
    (mine / "thesis.txt").write_text("not a demo")
    assert run_cli(demo, ["--work-dir", str(mine), "--fresh", "--no-serve", "--base", "tiny"]) == 2
    assert "deletes only a work dir this command created" in capsys.readouterr().err
    assert (mine / "thesis.txt").is_file()


def test_a_client_that_goes_away_frees_the_engine_at_once(merged_model):
    """A stream closed after 3 chunks (Stop pressed, client gone) ends generation within a token: a
    second user's reply starts at once instead of after max_new_tokens for nobody."""
    import time

    from inference import load

    engine = load(merged_model, device="cpu").engine()
    engine.stop = [engine.tokenizer.vocab_size - 1]     # a model that would never stop on its own
    msgs = [{"role": "user", "content": "Tell me a very long story."}]
    first = engine.stream_chat(msgs, max_new_tokens=2000)
    for _ in range(3):
        next(first)
    first.close()
    start = time.monotonic()
    second = next(engine.stream_chat(msgs, max_new_tokens=4))
    assert time.monotonic() - start < 1.0 and second
