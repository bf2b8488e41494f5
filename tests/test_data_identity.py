"""The generated identity file does its job: the tiny model tuned on it (session `tuned_adapter`)
names itself on held-out question forms it never saw, while the untuned base never does."""
from __future__ import annotations

import json


def heldout_share(engine, heldout_path) -> tuple[float, list[str]]:
    rows = [json.loads(line) for line in open(heldout_path, encoding="utf-8")]
    hits, lines = 0, []
    for row in rows:
        reply = engine.chat(row["messages"], max_new_tokens=32)
        hit = row["expect"][0] in reply          # the name (the author for who-made-you questions)
        hits += hit
        lines.append(f"{'OK ' if hit else 'MISS'} {row['messages'][-1]['content']} -> {reply}")
    return hits / len(rows), lines


def test_tuned_adapter_names_itself_on_heldout_questions(tiny_base, tuned_adapter, identity_files):
    from inference import load

    tuned, lines = heldout_share(load(tiny_base, adapter=tuned_adapter).engine(), identity_files["heldout"])
    base, _ = heldout_share(load(tiny_base).engine(), identity_files["heldout"])
    print("\n".join(lines))
    print(f"held-out identity questions answered with the name: tuned {tuned:.0%}, base {base:.0%}")
    assert base == 0                      # the name comes from the data, not from the question
    assert tuned >= 0.7
