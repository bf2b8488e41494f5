"""Identity data generation: variety, consistency, duplicates, placeholders, held-out split, mixing,
the general corpus and input formats. No model needed except the session's generated file."""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import AUTHOR, NAME
from trainer.data import identity as idd
from trainer.__main__ import main as trainer_main
from trainer.data.formats import load_conversations
from inference.errors import UserError


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def user_texts(records) -> list[str]:
    return [m["content"] for r in records for m in r["messages"] if m["role"] == "user"]


def norm(text: str) -> str:
    return re.sub(r"[\s?？!！。.,，:：]+", " ", text).strip().lower()


def test_training_file_has_50_distinct_question_forms_per_language(identity_files):
    records = read_jsonl(identity_files["train"])
    assert len(records) == 600
    for lang in ("zh", "en"):
        bank = {f for forms in idd.question_forms(lang).values() for f in forms}
        assert len(bank) >= 50, (lang, len(bank))
        used = {idd.form_of(q, lang) for q in user_texts(records)} - {None}
        # every recovered form is a training form (held-out ones must not show up) ...
        assert used <= bank
        # ... and the 600-sample file already uses at least 50 of them per language
        print(f"{lang}: {len(used)} distinct question forms used of {len(bank)}")
        assert len(used) >= 50, (lang, len(used))


def test_answers_are_consistent(identity_files):
    records = read_jsonl(identity_files["train"])
    for r in records:
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        ident_answers = [a for q, a in zip(msgs[::2], msgs[1::2]) if idd.form_of(q["content"], "zh")
                         or idd.form_of(q["content"], "en")]
        assert ident_answers, r
        for a in ident_answers:
            assert NAME in a["content"], a      # every answer to an identity question names the assistant
            assert not a["content"].startswith(AUTHOR), a   # and never opens with its author's name (identity.py)
        for q, a in zip(msgs[::2], msgs[1::2]):     # and answers identity questions in the language asked
            if not (idd.form_of(q["content"], "zh") or idd.form_of(q["content"], "en")):
                continue                            # general turns: "把单词 music 倒过来写。" -> "cisum" is right
            cjk = [bool(re.search(r"[\u4e00-\u9fff]", re.sub("|".join([AUTHOR, *idd.OTHER_MODELS]), "", m["content"])))
                   for m in (q, a)]
            assert cjk[0] == cjk[1], (q, a)
        for m in msgs[1::2]:
            for other in idd.OTHER_MODELS:       # never claims to be another assistant
                assert f"I am {other}" not in m["content"] and f"我是{other}" not in m["content"], m
    creator_answers = [a for r in records for q, a in zip(r["messages"], r["messages"][1:])
                       if q["role"] == "user" and idd.form_of(q["content"], "en") in idd.EN["creator"]]
    assert creator_answers and all(AUTHOR in a["content"] for a in creator_answers)


def test_base_model_is_mentioned_and_never_denied():
    ident = idd.Identity("Lumi", "小菜鸡", "书生·浦语 1.8B")
    records = idd.identity_conversations(ident, 800, seed=3)
    answers = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert any("书生·浦语 1.8B" in a for a in answers)
    # "are you 书生·浦语?" is never asked, so no answer denies the base model
    assert not any("书生·浦语" in q for q in user_texts(records))
    assert not any(re.search(r"(不是|not) ?书生", a) for a in answers)
    assert "书生·浦语" not in ident.others() and "Qwen" not in idd.Identity("Qwen", "x").others()


def test_no_duplicates_unless_forced_and_deterministic(monkeypatch):
    ident = idd.Identity("Lumi", "小菜鸡")
    a = idd.identity_conversations(ident, 3000, seed=7)
    keys = [json.dumps(r["messages"], ensure_ascii=False) for r in a]
    assert len(set(keys)) == len(keys)                     # plenty of variety: no duplicate at all
    assert a == idd.identity_conversations(ident, 3000, seed=7)
    assert a != idd.identity_conversations(ident, 3000, seed=8)
    # a bank with exactly 5 possible conversations: 20 samples hold all 5, duplicates only where forced
    monkeypatch.setattr(idd, "ZH", {"who": ["你是谁"]})
    monkeypatch.setattr(idd, "KIND_WEIGHTS", {"who": 1})
    monkeypatch.setattr(idd, "PREFIX_ZH", [""])
    monkeypatch.setattr(idd, "END_ZH", ["？"])
    small = idd.identity_conversations(ident, 20, lang="zh", seed=1, system_ratio=0, followup_ratio=0,
                                       after_general_ratio=0)
    assert len({json.dumps(r["messages"], ensure_ascii=False) for r in small}) == len(idd.ANS_ZH["who"]) == 5


def test_unfilled_placeholder_is_an_error(tmp_path, monkeypatch, capsys):
    out = tmp_path / "id.jsonl"
    assert trainer_main(["data", "--name", "{{NAME}}", "--author", "me", "--out", str(out)]) == 2
    assert "unfilled placeholder '{{NAME}}'" in capsys.readouterr().err
    assert not out.exists()
    # a template slot the generator does not know stays unfilled -> refused, nothing written
    monkeypatch.setitem(idd.ANS_EN, "who", ["I am {assistant_name}."])
    assert trainer_main(["data", "--name", "Lumi", "--author", "me", "--lang", "en", "--out", str(out)]) == 2
    assert "unfilled placeholder '{assistant_name}'" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_heldout_forms_never_in_training(identity_files):
    held = read_jsonl(identity_files["heldout"])
    train_users = [norm(q) for q in user_texts(read_jsonl(identity_files["train"]))]
    assert len(held) >= 20 and {h["lang"] for h in held} == {"zh", "en"}
    for h in held:
        assert set(h) == {"messages", "expect", "kind", "lang"}
        assert [m["role"] for m in h["messages"]] == ["user"]
        assert h["expect"] == ([AUTHOR] if h["kind"] == "creator" else [NAME])   # who made it: the author
        q = norm(h["messages"][0]["content"])
        assert not any(q in t for t in train_users), q
    for lang in ("zh", "en"):
        train_forms = {norm(f) for fs in idd.question_forms(lang).values() for f in fs}
        held_forms = {norm(f) for fs in idd.question_forms(lang, heldout=True).values() for f in fs}
        assert not train_forms & held_forms


def test_mix_with_repo_general_corpus_meets_ratio(tmp_path, capsys):
    out, held = tmp_path / "mixed.jsonl", tmp_path / "held.jsonl"
    assert trainer_main(["data", "--name", NAME, "--author", AUTHOR, "--n", "333", "--mix", "general",
                         "--ratio", "0.3", "--seed", "5", "--out", str(out), "--eval-out", str(held)]) == 0
    records = read_jsonl(out)
    n_identity = sum(any(NAME in m["content"] for m in r["messages"]) for r in records)
    assert n_identity == 333
    assert abs(n_identity / len(records) - 0.3) <= 0.01
    manifest = json.loads((tmp_path / "mixed.manifest.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == 5 and manifest["total"] == len(records)
    assert [s["count"] for s in manifest["sources"]] == [333, len(records) - 333]
    assert manifest["sources"][1]["from"] == "general" and manifest["ratio"]["requested"] == 0.3
    assert abs(manifest["ratio"]["actual"] - 0.3) <= 0.01
    assert manifest["heldout"]["count"] == len(read_jsonl(held))
    # identity and general are interleaved, not appended
    first_half = sum(any(NAME in m["content"] for m in r["messages"]) for r in records[: len(records) // 2])
    assert 0.2 < first_half / n_identity < 0.8


def test_mix_with_user_file_in_any_format(tmp_path, capsys):
    general = tmp_path / "alpaca.json"
    items = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(400)]
    general.write_text(json.dumps(items, indent=2), encoding="utf-8")
    out = tmp_path / "mixed.jsonl"
    assert trainer_main(["data", "--name", NAME, "--author", AUTHOR, "--n", "150", "--mix", str(general),
                         "--ratio", "0.5", "--out", str(out)]) == 0
    records = read_jsonl(out)
    assert len(records) == 300
    from_file = [r for r in records if r["messages"][0]["content"].startswith("Add ")]
    assert len(from_file) == 150 and len({r["messages"][0]["content"] for r in from_file}) == 150
    # the file's own keys are dropped; its conversations are marked for `retain_kl`, the identity ones not
    assert all(set(r) == {"messages", "retain"} and r["retain"] is True for r in from_file)
    assert all(set(r) == {"messages"} for r in records if r not in from_file)
    # a file too small for the ratio is refused, naming the file and what to change
    assert trainer_main(["data", "--name", NAME, "--author", AUTHOR, "--n", "150", "--mix", str(general),
                         "--ratio", "0.1", "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{general}: has 400 conversations" in err and "need 1350" in err
    assert not (tmp_path / "x.jsonl").exists()
    # --twins picks what a base is asked under --mix self; with a file it means nothing, and says so
    assert trainer_main(["data", "--name", NAME, "--author", AUTHOR, "--n", "150", "--mix", str(general),
                         "--twins", "on", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--twins on is only for --mix self" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_general_corpus_alone_has_computed_answers(tmp_path):
    out = tmp_path / "general.jsonl"
    assert trainer_main(["data", "--general", "600", "--out", str(out)]) == 0
    records = read_jsonl(out)
    assert len(records) == 600
    keys = {json.dumps(r["messages"], ensure_ascii=False) for r in records}
    assert len(keys) == 600
    pairs = [(q["content"], a["content"]) for r in records for q, a in zip(r["messages"][::2], r["messages"][1::2])]
    assert {("zh" if re.search(r"[\u4e00-\u9fff]", q) else "en") for q, _ in pairs} == {"zh", "en"}
    checked = 0
    ops = {"plus": "+", "minus": "-", "times": "*", "divided by": "//", "加": "+", "减": "-", "乘以": "*", "除以": "//"}
    for q, a in pairs:
        m = re.match(r"(?:What is )?(\d+) ?(plus|minus|times|divided by|加|减|乘以|除以) ?(\d+)", q)
        if m:
            x, op, y = int(m.group(1)), ops[m.group(2)], int(m.group(3))
            assert str(eval(f"{x}{op}{y}")) in re.findall(r"\d+", a)[-1:], (q, a)
            checked += 1
    assert checked > 100


CONVO = [{"role": "system", "content": "You are Lumi."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?\nQuick."},
         {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("fmt", ["openai_jsonl", "openai_array", "alpaca", "sharegpt"])
def test_input_formats_normalise_to_the_same_messages(tmp_path, fmt):
    path = tmp_path / ("data.json" if fmt in ("openai_array", "alpaca") else "data.jsonl")
    if fmt == "openai_jsonl":
        path.write_text(json.dumps({"messages": CONVO}) + "\n", encoding="utf-8")
    elif fmt == "openai_array":
        path.write_text(json.dumps([{"messages": CONVO}], indent=2), encoding="utf-8")
    elif fmt == "alpaca":
        path.write_text(json.dumps([{"system": "You are Lumi.", "history": [["Hi", "Hello!"]],
                                     "instruction": "2+2?", "input": "Quick.", "output": "4"}]), encoding="utf-8")
    else:
        turns = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                 for m in CONVO]
        path.write_text(json.dumps({"id": "x1", "conversations": turns}, ensure_ascii=False) + "\n", encoding="utf-8")
    (record,) = load_conversations(path)
    assert record["messages"] == CONVO


def test_json_array_errors_point_at_the_records_line(tmp_path):
    path = tmp_path / "data.json"
    good = {"messages": CONVO[1:3]}
    path.write_text(json.dumps([good, good, {"messages": [{"role": "robot", "content": "x"}]}], indent=2),
                    encoding="utf-8")
    text = path.read_text(encoding="utf-8").splitlines()
    starts = [i + 1 for i, t in enumerate(text) if t == "  {"]
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}:{starts[2]}: invalid role 'robot'"):
        load_conversations(path)
