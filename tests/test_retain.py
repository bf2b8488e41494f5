"""`retain_kl` (trainer/engine/retain.py): a KL term toward the base on the general conversations.

The chunked KL against the plain formula (value and gradient), which positions it covers, that the data mix
marks the general conversations only, and -- training the tiny base for real, twice -- that the term keeps
the tuned model's next-token distributions on those conversations closer to the base's while the identity
answers are learned as well as without it. Its effect on the real base's leakage is measured in
docs/BENCHMARKS.md ("Session 12"), not here.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from trainer.engine.retain import kl_to_base, retained_positions


def test_chunked_kl_equals_the_full_kl_in_value_and_gradient():
    torch.manual_seed(0)
    tuned = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    base = torch.randn(23, 8, dtype=torch.float64)
    weight = torch.randn(40, 8, dtype=torch.float64)
    want = F.kl_div((tuned @ weight.t()).log_softmax(-1), (base @ weight.t()).log_softmax(-1),
                    log_target=True, reduction="sum")
    want.backward()
    want_grad, tuned.grad = tuned.grad.clone(), None
    got = kl_to_base(tuned, base, weight, chunk_rows=5)       # 5 chunks, the last one short
    got.backward()
    assert torch.allclose(got.double(), want, rtol=1e-5)
    assert torch.allclose(tuned.grad, want_grad, rtol=1e-5, atol=1e-8)
    assert float(kl_to_base(base, base, weight)) == pytest.approx(0.0, abs=1e-6)


def test_only_the_marked_answer_tokens_are_held_to_the_base():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, -100, -100]])
    retain = torch.tensor([[True] * 5, [False] * 5])
    # position t predicts token t + 1: row 0's answer tokens 5 and 6 are predicted at positions 1 and 2
    assert retained_positions(labels, retain).tolist() == [[False, True, True, False, False], [False] * 5]


def test_an_answer_given_to_another_prompt_is_compared_after_that_prompt(tiny_base):
    """A Chinese prompt trained on the base's answer to its English twin (`base_prompt`): the base reads the
    twin, and the same answer tokens are marked on both sides, in order -- also inside packed rows."""
    from transformers import AutoTokenizer

    from inference.chat_format import encode_chat
    from trainer.engine.dataset import Collator, pack
    from trainer.engine.retain import retain_marks

    tok = AutoTokenizer.from_pretrained(tiny_base)
    samples = []
    for q, twin, a in (("猫有几条腿？", "How many legs does a cat have?", "A cat has four legs."),
                       ("天空是什么颜色的？", "What colour is the sky?", "The sky is blue on a clear day.")):
        record = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                  "retain": True, "base_prompt": twin}
        sample = encode_chat(tok, record["messages"])
        sample.update(retain_marks(record, tok, sample, 256, None))
        own = [t for t, r in zip(sample["input_ids"], sample["retain"]) if r]
        theirs = [t for t, r in zip(sample["base_input_ids"], sample["base_retain"]) if r]
        assert own == theirs and tok.decode(own).strip().startswith(a[:10])
        assert twin in tok.decode(sample["base_input_ids"]) and q not in tok.decode(sample["base_input_ids"])
        samples.append(sample)
    for packed, rows in ((False, samples), (True, pack(samples, 256))):
        batch = Collator(tok.pad_token_id, packed, retain=True)(rows)
        ours = retained_positions(batch["labels"], batch["retain"])
        theirs = retained_positions(batch["base_labels"], batch["base_retain"])
        assert ours.sum(1).tolist() == theirs.sum(1).tolist() and ours.any()
        # the tokens predicted at the marked positions, row by row: the same answers on both sides
        predicted = batch["input_ids"][:, 1:][ours[:, :-1]]
        assert predicted.tolist() == batch["base_input_ids"][:, 1:][theirs[:, :-1]].tolist()


def test_the_data_mix_marks_the_general_conversations_only(tmp_path):
    from trainer.commands.data import main

    out = tmp_path / "d.jsonl"
    assert main(["--name", "Lumi", "--author", "Ada", "--n", "20", "--mix", "general", "--ratio", "0.5",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    marked = [r for r in records if r.get("retain")]
    assert len(marked) == 20 and len(records) == 40
    assert not any("Lumi" in m["content"] for r in marked for m in r["messages"])
    assert all("Lumi" in json.dumps(r, ensure_ascii=False) for r in records if not r.get("retain"))


def test_retain_kl_needs_the_base_so_method_lora():
    from inference.errors import UserError
    from trainer.engine.config import load_config

    with pytest.raises(UserError, match="retain_kl needs the base"):
        load_config("tiny", {"method": "full", "retain_kl": 1.0})


def _kl_and_identity_loss(base_dir, adapter, data):
    """Mean KL(base || tuned) on the marked answers; the tuned and the base's mean loss on the unmarked
    (identity) answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.engine.dataset import Collator, encode_files

    tok = AutoTokenizer.from_pretrained(base_dir)
    samples, _ = encode_files([str(data)], tok, 128, None, retain=True)
    batch = Collator(tok.pad_token_id, packed=False, retain=True)(samples)
    retain = batch.pop("retain")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    with torch.no_grad():
        tuned = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    where = retained_positions(batch["labels"], retain)
    kl = F.kl_div(tuned[where].log_softmax(-1), base[where].log_softmax(-1), log_target=True, reduction="batchmean")
    ident = ~retain.any(dim=1)
    shifted = batch["labels"][ident][:, 1:]
    losses = [F.cross_entropy(logits[ident][:, :-1].transpose(1, 2), shifted, ignore_index=-100)
              for logits in (tuned, base)]
    return float(kl), *map(float, losses)


def test_retain_kl_keeps_the_general_answers_near_the_base_and_still_learns_the_name(tiny_base, tmp_path):
    from trainer.commands.data import main
    from trainer.engine.config import load_config
    from trainer.engine.train import train

    data = tmp_path / "d.jsonl"
    assert main(["--name", "Lumi", "--author", "Ada", "--n", "48", "--mix", "general", "--ratio", "0.5",
                 "--out", str(data)]) == 0
    scores = {}
    for weight in (0.0, 4.0):
        cfg = load_config("tiny", {"model": str(tiny_base), "data": [str(data)], "max_steps": 40, "lr": 3e-3,
                                   "work_dir": str(tmp_path / f"w{weight}"), "save_steps": 0,
                                   "evaluation_inputs": [], "retain_kl": weight})
        scores[weight] = _kl_and_identity_loss(tiny_base, train(cfg, echo=lambda s: None), data)
    (kl_plain, ident_plain, ident_base), (kl_kept, ident_kept, _) = scores[0.0], scores[4.0]
    assert kl_kept < 0.5 * kl_plain, scores            # the general answers' distributions stay near the base's
    # and the identity answers are learned all the same: the loss on them falls as far from the base's
    assert ident_base - ident_kept > 0.8 * (ident_base - ident_plain) > 0, scores


def test_the_base_reads_each_row_once_and_later_epochs_reuse_its_hidden_states(tiny_base, tmp_path):
    """The base's hidden states at a row's answer tokens are kept after its first forward pass: the same rows
    again -- padded differently, inside another batch, as in a later epoch -- cost no base forward pass, and the
    KL is the one computed afresh; a new row is read once."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from inference.chat_format import encode_chat
    from trainer.engine.dataset import Collator
    from trainer.engine.retain import RetainTrainer
    from trainer.engine.speed import causal_lm

    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))  # tuned != base
    samples = []
    for q, a in (("What is 2 + 2?", "2 + 2 = 4."), ("Name a colour.", "Blue is a colour."),
                 ("Tell me about the sea.", "The sea is large, deep and salty, and it covers most of the Earth.")):
        s = encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        samples.append({**s, "retain": [True] * len(s["input_ids"])})
    trainer = RetainTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                            retain_kl=1.0)
    decoder = causal_lm(model).get_decoder()

    def kl(rows_of):
        batch = Collator(tok.pad_token_id, packed=False, retain=True)(rows_of)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        where = retained_positions(batch["labels"], batch["retain"].bool())
        rows = where.any(dim=1).nonzero().squeeze(1)
        with torch.no_grad():
            tuned = decoder(**inputs).last_hidden_state[rows][where[rows]]
            with model.disable_adapter():
                fresh = decoder(**inputs).last_hidden_state[rows][where[rows]]
            want = kl_to_base(tuned, fresh, causal_lm(model).get_output_embeddings().weight) / where.sum()
            base_h = trainer._base_states(model, dict(batch), rows, where[rows])
            got = kl_to_base(tuned, base_h, causal_lm(model).get_output_embeddings().weight) / where.sum()
        return float(got), float(want)

    got, want = kl(samples[:2])
    assert got == pytest.approx(want, rel=1e-5) and want > 1e-3 and trainer.base_forwards == 2
    got, want = kl([samples[2], samples[1], samples[0]])     # rows 0 and 1 again, padded to row 2's length
    assert got == pytest.approx(want, rel=1e-4) and trainer.base_forwards == 3
    got, want = kl(samples)
    assert got == pytest.approx(want, rel=1e-4) and trainer.base_forwards == 3


@pytest.mark.parametrize("accum", [1, 2])
def test_the_fused_loss_takes_the_kl_term_with_the_same_loss_and_gradients(tiny_base, tmp_path, accum):
    """With `fused_loss` the KL shares the cross-entropy's logits (trainer/engine/speed.py); the step's loss and
    every adapter gradient are those of the loss and KL computed apart -- identity and general rows in one batch,
    with and without gradient accumulation (the Trainer's own loss scaling)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from inference.chat_format import encode_chat
    from trainer.engine.dataset import Collator
    from trainer.engine.retain import RetainTrainer
    from trainer.engine.speed import causal_lm, enable_fused_loss

    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))  # tuned != base
    assert enable_fused_loss(model)
    samples = []
    for q, a, keep in (("Who are you?", "I am Lumi, made by Ada.", False), ("Name a colour.", "Blue is a colour.", True),
                       ("Tell me about the sea.", "The sea is large, deep and salty.", True)):
        s = encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        samples.append({**s, "retain": [keep] * len(s["input_ids"])})
    batch = Collator(tok.pad_token_id, packed=False, retain=True)(samples)
    trainer = RetainTrainer(model=model, retain_kl=0.5, args=TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_accumulation_steps=accum))
    trainer.current_gradient_accumulation_steps = accum
    items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    lm = causal_lm(model)
    results = {}
    for fused in (True, False):
        lm.fused_loss = fused              # False: the KL computed on its own from the caught hidden states
        model.zero_grad()
        model.train()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[fused] = (float(loss), grads, float(trainer._kl_logged) / trainer._kl_count)
        trainer._kl_logged, trainer._kl_count = 0.0, 0
    (loss_f, grads_f, kl_f), (loss_a, grads_a, kl_a) = results[True], results[False]
    assert loss_f == pytest.approx(loss_a, rel=1e-5) and kl_f == pytest.approx(kl_a, rel=1e-5) and kl_a > 1e-3
    # float32 sums in another order: compare each gradient against its own scale
    off = {n: float((grads_f[n] - grads_a[n]).abs().max() / grads_a[n].abs().max()) for n in grads_a}
    assert len(off) > 0 and max(off.values()) < 1e-5, sorted(off.items(), key=lambda x: -x[1])[:4]
