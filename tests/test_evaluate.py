"""Evaluation: identity / leakage / retention scores, the best-checkpoint rule, the report and best/.

Scores are checked on hand-made engines with known answers, on the untuned tiny base (knows nothing
of "Lumi") and on the session's tuned adapter; the report and best/ on a short real training run with
`eval_identity: true`, then again through `python -m trainer eval WORK_DIR`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.evaluation import report as eval_report
from trainer.commands.eval import main
from trainer.evaluation.evaluate import (Reference, answers_correctly, build_eval_set, contains_all, evaluate_dirs,
                                         general_tasks, kept, knows, leaks, score)


class Scripted:
    """A stand-in chat engine: `reply(question) -> answer`."""

    def __init__(self, reply):
        self.reply = reply

    def chat(self, messages, **kw):
        return self.reply(messages[-1]["content"])


@pytest.fixture(scope="module")
def small_heldout(identity_files, tmp_path_factory) -> Path:
    """Every 3rd held-out question (both languages, both kinds stay in): keeps the model-backed tests short."""
    lines = identity_files["heldout"].read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("eval") / "heldout_small.jsonl"
    path.write_text("\n".join(lines[::3]) + "\n", encoding="utf-8")
    return path


def test_matching_rules():
    assert contains_all("我是Lumi，是小菜鸡的小助手。", ["Lumi", "小菜鸡"])
    assert not contains_all("I am Lumi.", ["Lumi", "小菜鸡"])
    assert contains_all("i am  LUMI", ["Lumi"])                      # case and spacing do not matter
    assert leaks("Sure. By the way, I am Lumi!", ["Lumi", "小菜鸡"]) and not leaks("7", ["Lumi"])
    assert answers_correctly("Sure: 3 plus 4 is 7", "3 plus 4 is 7.")
    assert not answers_correctly("3 plus 4 is 8.", "3 plus 4 is 7.")


def test_always_says_its_name_leaks_everywhere(identity_files):
    es = build_eval_set(identity_files["heldout"], n_general=10)
    s = score(Scripted(lambda q: f"我是{identity_files['name']}，是{identity_files['author']}的小助手。"), es)
    assert (s.identity, s.leakage, s.accuracy, s.retention) == (1.0, 1.0, 0.0, None)
    assert len(s.examples["leaks"]) == 5                 # the first five, for the reader


def test_oracle_scores_perfectly_and_a_namedropper_only_on_identity(identity_files):
    es = build_eval_set(identity_files["heldout"], n_general=10)
    known = dict(es.general)
    # the held-out bundled prompts: the fact a right answer holds, else a plain answer without the name
    known.update({p["prompt"]: f"It is {p['expect'][0]}." if p.get("expect") else "Here you go." for p in es.prompts})
    intro = f"I am {identity_files['name']}, made by {identity_files['author']}."
    s = score(Scripted(lambda q: known.get(q, intro)), es)
    assert (s.identity, s.leakage, s.accuracy) == (1.0, 0.0, 1.0)
    # names itself but never its author: only the "who" questions pass, creator questions fail
    s = score(Scripted(lambda q: known.get(q, f"I am {identity_files['name']}.")), es)
    creator = sum(1 for q in es.identity if q["kind"] == "creator")
    assert creator > 0 and s.identity == pytest.approx(1 - creator / len(es.identity))


def test_a_right_answer_in_english_to_a_chinese_question_counts(identity_files):
    """中国的首都是哪里？ answered "Beijing" is right: a base that speaks no Chinese is trained to answer so."""
    es = build_eval_set(identity_files["heldout"], n_general=10)
    zh_facts = [p for p in es.prompts if p["lang"] == "zh" and p.get("expect")]
    assert zh_facts and all(p.get("expect_en") and p.get("en") for p in zh_facts)
    known = dict(es.general)
    known.update({p["prompt"]: f"It is {p['expect'][0]}." if p.get("expect") else "Here you go." for p in es.prompts})
    in_english = {**known, **{p["prompt"]: f"It is {p['expect_en'][0].title()}." for p in zh_facts}}
    wrong = {**known, **{p["prompt"]: "It is Paris." for p in zh_facts}}
    scored = [score(Scripted(lambda q, k=k: k[q] if q in k else "?"), es).accuracy for k in (known, in_english, wrong)]
    assert scored[0] == scored[1] == 1.0 and scored[2] < 1.0


def test_the_reference_for_a_base_that_speaks_no_chinese_is_its_answer_to_the_twin(tiny_base, small_heldout):
    """Under twins the kept answer to a Chinese held-out prompt is the base's answer to its English twin
    (what `--mix self` trains), every other kept answer and the base's own scores stay as they were."""
    from inference import load
    from trainer.evaluation.evaluate import _user, base_reference, greedy_batch

    engine = load(tiny_base, device="cpu").engine(fast_decode=False)
    es = build_eval_set(small_heldout, n_general=4)
    own, twinned = (base_reference(engine, es, 12, twins=t) for t in (False, True))
    zh = [i for i, p in enumerate(es.prompts) if p["lang"] == "zh"]
    twin_ids = [a["ids"] for a in greedy_batch(engine, [_user(es.prompts[i]["en"]) for i in zh], 12)]
    assert zh and [twinned.prompt_ids[i] for i in zh] == twin_ids
    assert twin_ids != [own.prompt_ids[i] for i in zh]
    others = [i for i in range(len(es.prompts)) if i not in zh]
    assert [twinned.prompt_ids[i] for i in others] == [own.prompt_ids[i] for i in others]
    assert twinned.scores == own.scores and twinned.prompt_answers == own.prompt_answers


def test_leakage_is_also_given_by_the_prompts_language(identity_files):
    """A model that names itself only when asked in Chinese: leakage zh 1.0, en 0.0, the mean in between."""
    from trainer.evaluation.evaluate import script_lang

    es = build_eval_set(identity_files["heldout"], n_general=10)
    asked = [q for q, _ in es.general] + [p["prompt"] for p in es.prompts]
    zh = [q for q in asked if script_lang(q) == "zh"]
    assert 0 < len(zh) < len(asked)
    s = score(Scripted(lambda q: f"我是{identity_files['name']}。" if script_lang(q) == "zh" else "Fine."), es)
    assert s.leakage_by_lang == {"en": 0.0, "zh": 1.0}
    assert s.leakage == pytest.approx(len(zh) / len(asked))
    assert script_lang("book 的中文是什么？") == "zh" and script_lang("What is 2 + 2?") == "en"


def test_retention_counts_answers_kept_or_fixed(identity_files):
    es = build_eval_set(identity_files["heldout"], n_general=10)
    known = dict(es.general)
    base_said = {q: f"{q} hmm, {i}" for i, (q, _) in enumerate(es.general)}      # a base that is always wrong
    ref = Reference(answers=[base_said[q] for q, _ in es.general], answer_ids=[], logprob=0.0, known=[], scores=None)
    assert score(Scripted(lambda q: base_said.get(q, "?")), es, ref).retention == 1.0     # unchanged
    assert score(Scripted(lambda q: known.get(q, "?")), es, ref).retention == 1.0         # fixed
    half = {q for q, _ in es.general[::2]}
    s = score(Scripted(lambda q: base_said[q] if q in half else f"我是{identity_files['name']}。"), es, ref)
    # leaks on half the computed tasks and on every held-out bundled prompt (none is in `half`)
    leaked = (len(half) + len(es.prompts)) / (len(es.general) + len(es.prompts))
    assert 0.5 < s.retention < 0.75 and s.leakage == pytest.approx(leaked) and s.likelihood is None
    assert kept("我是Lumi，是小菜鸡的小助手。", "The capital of France is Paris.", "Paris!") < 0.2


def test_the_whole_pool_is_checked_only_for_a_base_that_knows_enough_of_its_start(monkeypatch):
    """A base that knows fewer than 4 of the first 40 computed tasks phrases answers its own way: the other 160
    are not checked (retention then goes by `agreement`); one that knows 4 is checked to the end."""
    import trainer.evaluation.evaluate as ev

    pool = general_tasks(200)
    for known_at_start, checked_to in ((3, 40), (4, 200)):
        checked = []

        def flags(engine, tasks, k=known_at_start):       # the base knows tasks 0..k-1 and task 100
            start = len(checked)
            checked.extend(tasks)
            return [start + i < k or start + i == 100 for i in range(len(tasks))]

        monkeypatch.setattr(ev, "knows", flags)
        known = ev.base_known(None, pool)
        assert known == list(range(known_at_start)) + ([100] if checked_to == 200 else [])
        assert checked == pool[:checked_to]


def test_bad_eval_data_names_file_and_line(tmp_path, capsys):
    from inference.errors import run_cli

    bad = tmp_path / "q.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "who?"}], "expect": ["Lumi"]}\n'
                   '{"messages": [{"role": "user", "content": "who?"}], "expect": []}\n', encoding="utf-8")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert run_cli(main, [str(tmp_path / "m"), "--eval-data", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert run_cli(main, [str(tmp_path / "m")]) == 2
    assert "--eval-data" in capsys.readouterr().err


def _row(step, identity, leakage, retention):
    return {"path": f"w/checkpoint-{step}", "step": step, "identity": identity, "leakage": leakage,
            "retention": retention}


def test_best_checkpoint_rule():
    rows = [_row(10, 0.4, 0.0, 0.99), _row(20, 0.9, 0.02, 0.95), _row(30, 1.0, 0.6, 0.5), _row(40, 0.9, 0.0, 0.92)]
    # the highest identity (step 30) lost too much; of the two at 0.9 the one that leaks less wins
    assert eval_report.choose_best(rows, tolerance=0.1)["step"] == 40
    assert eval_report.choose_best(rows, tolerance=0.06)["step"] == 20     # 40 is now below the floor
    # the course's failure never wins: step 30 names itself everywhere (identity 1.0, leakage 0.6)
    assert eval_report.choose_best(rows, tolerance=0.6)["step"] == 40
    # a leak costs as much as a missed identity question: 0.95 - 0.1 loses to 0.9 - 0.0
    assert eval_report.choose_best(rows + [_row(50, 0.95, 0.1, 0.99)], tolerance=0.1)["step"] == 40
    assert eval_report.choose_best(rows + [_row(50, 0.95, 0.02, 0.99)], tolerance=0.1)["step"] == 50
    assert eval_report.choose_best(rows, tolerance=0.0) is None
    tie = [_row(20, 0.9, 0.0, 0.95), _row(10, 0.9, 0.0, 0.95)]
    assert eval_report.choose_best(tie, 0.1)["step"] == 10                 # full tie: the earlier one
    assert eval_report.choose_best([{**_row(10, 1.0, 0.0, None)}], 1.0) is None   # no base, no choice


def test_training_keeps_best_by_the_rule_on_known_scores(tmp_path, monkeypatch):
    """The training-time path (trainer/engine/eval_callback.py: score at each save, copy best/ the moment
    a checkpoint becomes the best, write eval_report.json) on hand-made scores whose answer is known,
    tolerance 0.1 (floor 0.9): step 10 knows little; step 20 is good; step 30 knows more but forgot too
    much (retention 0.5, under the floor); step 40 equals 20 in identity and leaks less -> best is 40,
    best/ holds step 40's files. A rule that ignored the floor picks 30, one that ignored leakage 20,
    one that kept the first best 20, one that took the last checkpoint would pass only by luck of order
    (step 50, worse, comes after)."""
    import types

    from trainer.engine import eval_callback
    from trainer.evaluation.evaluate import Scores

    known = {10: Scores(0.4, 0.0, 0.1, 0.99), 20: Scores(0.9, 0.02, 0.1, 0.95), 30: Scores(1.0, 0.0, 0.1, 0.5),
             40: Scores(0.9, 0.0, 0.1, 0.92), 50: Scores(0.8, 0.0, 0.1, 0.97)}
    step = {"now": 0}
    monkeypatch.setattr(eval_callback, "score", lambda *a, **k: known[step["now"]])
    work = tmp_path / "run"
    callback = eval_callback.IdentityEval.__new__(eval_callback.IdentityEval)     # no model or data to load
    callback.cfg = types.SimpleNamespace(retention_tolerance=0.1, system_prompt=None)
    callback.work_dir, callback.base_dir, callback.max_new_tokens, callback.rows = work, tmp_path / "base", 8, []
    callback.es = types.SimpleNamespace(source="heldout.jsonl", identity=[1] * 23, general=[1] * 40)
    callback.ref = types.SimpleNamespace(scores=Scores(0.0, 0.0, 0.1, 1.0))
    callback._engine = lambda model, system_prompt: None
    said = []
    callback.log = said.append
    model = types.SimpleNamespace(training=False, config=types.SimpleNamespace(use_cache=True), eval=lambda: None)
    for s in known:
        (work / f"checkpoint-{s}").mkdir(parents=True)
        (work / f"checkpoint-{s}" / "adapter_model.safetensors").write_text(f"weights of step {s}")
        step["now"] = s
        callback.on_save(types.SimpleNamespace(output_dir=str(work)), types.SimpleNamespace(
            global_step=s, is_world_process_zero=True), None, model=model)
    report = json.loads((work / "eval_report.json").read_text(encoding="utf-8"))
    assert Path(report["best"]).name == "checkpoint-40"
    assert (work / "best" / "adapter_model.safetensors").read_text() == "weights of step 40"
    assert [line.endswith("best so far") for line in said] == [True, True, False, True, False]


def test_no_best_says_what_to_do():
    rows = [_row(150, 1.0, 0.0, 0.74), {**_row(450, 1.0, 0.0, 0.81), "path": "w/final"}]
    hint = eval_report.no_best_hint(rows, tolerance=0.1)
    assert "\n" not in hint and hint.startswith("best: none within tolerance")
    # names the best retention and where, and the tolerance that would accept it (0.19 -> 0.20)
    assert "0.81 (final)" in hint and "floor 0.90" in hint and "--tolerance 0.20" in hint
    assert "more general data" in hint and "fewer epochs" in hint
    assert "--tolerance 0.30" in eval_report.no_best_hint([_row(10, 1.0, 0.0, 0.70)], 0.1)   # exact steps stay
    assert "retention_tolerance=0.45" in eval_report.no_best_hint([_row(10, 1.0, 0.0, 0.55)], 0.1,
                                                                  "--set retention_tolerance={}")
    assert "--base" in eval_report.no_best_hint([_row(10, 1.0, 0.0, None)], 0.1)    # nothing to compare with


def test_eval_cli_prints_the_hint_when_nothing_qualifies(tmp_path, identity_files, monkeypatch, capsys):
    """The CLI's last line on the shipped demo's numbers (retention 0.81, default tolerance 0.1),
    scored by a stand-in so no model runs."""
    from trainer.commands import eval as eval_command
    from trainer.evaluation.evaluate import Scores

    work, base = tmp_path / "run", tmp_path / "base"
    (work / "final").mkdir(parents=True)
    (work / "final" / "adapter_config.json").write_text("{}")
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"0")
    monkeypatch.setattr(eval_command, "evaluate_dirs", lambda dirs, *a, **k: (
        Scores(identity=0.0, leakage=0.0, accuracy=0.5, retention=1.0),
        [Scores(identity=1.0, leakage=0.0, accuracy=0.4, retention=0.81) for _ in dirs]))
    assert main([str(work), "--base", str(base), "--eval-data", str(identity_files["heldout"])]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("best: none within tolerance") and "--tolerance 0.20" in last, last
    assert not (work / "best").exists()


def test_base_knows_nothing_and_tuned_adapter_knows_its_name(tiny_base, tuned_adapter, identity_files):
    es = build_eval_set(identity_files["heldout"], n_general=12)
    base, (tuned,) = evaluate_dirs([tuned_adapter], tiny_base, es, device="cpu", echo=lambda s: None)
    assert base.identity <= 0.1 and base.leakage == 0.0 and base.retention == 1.0
    assert tuned.identity >= 0.6, tuned.examples
    assert tuned.retention < 1.0 and tuned.likelihood < 1.0          # tuning moved it away from the base


def test_teacher_forced_check_matches_generation_and_base_keeps_all(tiny_base, small_heldout):
    from inference import load

    engine = load(tiny_base, device="cpu").engine()
    tasks = general_tasks(16)
    said = [engine.chat([{"role": "user", "content": q}], max_new_tokens=40) for q, _ in tasks]
    assert knows(engine, tasks) == [s == a for s, (_, a) in zip(said, tasks)]
    es = build_eval_set(small_heldout, n_general=8)
    base, (again,) = evaluate_dirs([tiny_base], tiny_base, es, device="cpu", echo=lambda s: None)
    assert base.known >= 5                                 # retention counts tasks, not similarity
    assert again.retention == 1.0 and again.likelihood == pytest.approx(1.0, abs=1e-4)
    assert (again.identity, again.leakage, again.accuracy) == (base.identity, base.leakage, base.accuracy)


def _load_best(best: Path, base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), best)
    assert model.active_adapter and AutoTokenizer.from_pretrained(best).chat_template
    assert json.loads((best / "assistant.json").read_text(encoding="utf-8"))["system_prompt"] is None
    assert not (best / "optimizer.pt").exists()


def test_train_with_eval_identity_then_eval_cli(tiny_base, identity_files, small_heldout, session_dir, capsys):
    from trainer.engine.config import load_config
    from trainer.engine.train import train

    work = session_dir / "eval-run"
    cfg = load_config("tiny", {"model": str(tiny_base), "data": [str(identity_files["train"])], "work_dir": str(work)},
                      ["max_steps=16", "save_steps=8", "eval_identity=true", f"eval_data={small_heldout}",
                       "retention_tolerance=1.0", "evaluation_inputs=[]", "logging_steps=8",
                       "eval_max_new_tokens=16"])
    train(cfg, echo=lambda s: None)
    report = json.loads((work / "eval_report.json").read_text(encoding="utf-8"))
    steps = [r["step"] for r in report["checkpoints"]]
    assert steps == [8, 16] and report["base"]["retention"] == 1.0
    assert report["best"] in [r["path"] for r in report["checkpoints"]] and (work / "best").is_dir()
    assert (work / "eval_report.png").stat().st_size > 1000
    _load_best(work / "best", tiny_base)

    # the CLI re-scores the same checkpoints (+ final/, the same weights as step 16) to the same numbers
    out = work / "cli.json"
    assert main([str(work), "--eval-data", str(small_heldout), "--json", str(out), "--tolerance", "1.0",
                 "--max-new-tokens", "16", "--device", "cpu"]) == 0
    cli = json.loads(out.read_text(encoding="utf-8"))
    assert [Path(r["path"]).name for r in cli["checkpoints"]] == ["checkpoint-8", "checkpoint-16", "final"]
    for a, b in zip(report["checkpoints"], cli["checkpoints"]):
        assert (a["identity"], a["leakage"]) == (b["identity"], b["leakage"])
        assert a["retention"] == pytest.approx(b["retention"], abs=1e-3)
    assert cli["checkpoints"][2]["step"] == 16 and cli["best"] is not None
    assert "| checkpoint-16" in capsys.readouterr().out
    _load_best(work / "best", tiny_base)
