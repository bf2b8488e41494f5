"""Bundled self-answers (trainer/data/self_distill.py): the base's own answers ship with the repo and are
used only for the very weights they were made from.

The tiny base answers a few prompts through `write_bundle` (real generation); the bundle's answers are
then marked, so a conversation that carries the mark can only have come from the bundle, and one that
does not was generated again. The shipped bundle of the real base is checked in tests/test_real_base.py.
"""
from __future__ import annotations

import json
import shutil

import pytest

PROMPTS = ["What is the capital of France?", "Name a color.", "你好", "Say hello."]
ASKED = [{"prompt": p, "lang": "en"} for p in PROMPTS]


@pytest.fixture()
def bundle_env(tiny_base, tmp_path, monkeypatch):
    import trainer.data.prompts as prompts
    import trainer.data.self_distill as sd

    monkeypatch.setattr(prompts, "train_prompts", lambda lang="both": [dict(p) for p in ASKED])
    monkeypatch.setattr(sd, "BUNDLE_DIR", tmp_path / "bundles")
    monkeypatch.setenv("OWN_ASSISTANT_CACHE", str(tmp_path / "cache"))    # no answers cached from elsewhere
    out = sd.write_bundle(tiny_base, tmp_path / "bundles" / "tiny.json", echo=lambda s: None)
    bundle = json.loads(out.read_text(encoding="utf-8"))
    for i, p in enumerate(PROMPTS[:3]):                   # the 4th prompt is left out of the bundle
        bundle["answers"][p] = {"text": f"Bundled answer number {i}.", "finished": True}
    del bundle["answers"][PROMPTS[3]]
    out.write_text(json.dumps(bundle, ensure_ascii=False), encoding="utf-8")
    return sd, bundle


def test_a_bundle_records_how_it_was_made(bundle_env, tiny_base):
    sd, bundle = bundle_env
    assert bundle["weights_sha256"] == sd.weights_sha256(tiny_base)
    assert bundle["key"] == {"cache_version": sd.CACHE_VERSION, "system_prompt": sd.SYSTEM_PROMPT,
                             "max_new_tokens": sd.MAX_NEW_TOKENS}
    assert {"torch", "transformers", "date"} <= set(bundle["made_with"])
    assert "python -m trainer self-answers" in bundle["about"]


def test_the_bundle_answers_for_the_same_weights_and_the_rest_is_generated(bundle_env, tiny_base):
    sd, _ = bundle_env
    said = []
    convs = sd.self_conversations(tiny_base, ASKED, sd.SYSTEM_PROMPT, echo=said.append)
    answers = {c["messages"][0]["content"]: c["messages"][1]["content"] for c in convs}
    assert [answers[p] for p in PROMPTS[:3]] == [f"Bundled answer number {i}." for i in range(3)]
    assert any("3 of the base's own answers from tiny.json" in s for s in said), said
    assert any("answering 1 general prompts" in s for s in said), said       # only the one left out
    assert PROMPTS[3] not in answers or not answers[PROMPTS[3]].startswith("Bundled")


def test_other_weights_or_settings_never_use_the_bundle(bundle_env, tiny_base, tmp_path):
    sd, _ = bundle_env
    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                                          # one bit of one weight differs
    weights.write_bytes(bytes(data))
    for model, system in ((other, sd.SYSTEM_PROMPT), (tiny_base, "You are someone else.")):
        said = []
        convs = sd.self_conversations(model, ASKED, system, echo=said.append)
        assert not any(c["messages"][1]["content"].startswith("Bundled") for c in convs), convs
        assert any(f"answering {len(PROMPTS)} general prompts" in s for s in said), said


def _with_languages(tiny_base, path, languages):
    """The tiny base's very weights (so the bundle applies) with an import record naming LANGUAGES."""
    shutil.copytree(tiny_base, path)
    (path / "gguf_source.json").write_text(json.dumps({"languages": languages}), encoding="utf-8")
    return path


def test_a_base_that_speaks_no_chinese_answers_chinese_prompts_in_their_english_twin(bundle_env, tiny_base,
                                                                                      tmp_path):
    sd, _ = bundle_env
    zh = {"prompt": "法国的首都是哪里？", "lang": "zh", "en": PROMPTS[0]}
    english_only = _with_languages(tiny_base, tmp_path / "en-only", ["en"])
    assert sd.use_twins(english_only) and not sd.use_twins(english_only, "off")
    said = []
    convs = sd.self_conversations(english_only, [zh, ASKED[1]], sd.SYSTEM_PROMPT,
                                  twins=sd.use_twins(english_only), echo=said.append)
    answers = {c["messages"][0]["content"]: c["messages"][1]["content"] for c in convs}
    # the Chinese prompt is what the tuned model sees; the base's answer to its twin is what it learns
    assert answers == {zh["prompt"]: "Bundled answer number 0.", PROMPTS[1]: "Bundled answer number 1."}
    assert any("1 Chinese prompts asked in English" in s for s in said), said
    # a base that speaks Chinese, or one whose languages are not known, is asked the Chinese prompt itself
    both = _with_languages(tiny_base, tmp_path / "both", ["en", "zh"])
    assert not sd.use_twins(both) and not sd.use_twins(tiny_base) and sd.use_twins(tiny_base, "on")
    said = []
    convs = sd.self_conversations(both, [zh], sd.SYSTEM_PROMPT, twins=sd.use_twins(both), echo=said.append)
    assert not any(c["messages"][1]["content"].startswith("Bundled") for c in convs), convs
    assert any("answering 1 general prompts" in s for s in said), said
