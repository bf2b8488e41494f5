"""Packing: several conversations share a row without attending to each other, optimise the same
objective as unpadded batches, and train to the same loss in fewer steps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference.chat_format import encode_chat
from trainer.engine.dataset import MIN_STEPS, Collator, choose_packing, optimizer_steps, pack


@pytest.fixture(scope="module")
def tok_model(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    model.config.use_cache = False           # as in training: packing is detected only without a cache
    return AutoTokenizer.from_pretrained(tiny_base), model


@pytest.fixture(scope="module")
def samples(tok_model, identity_files) -> list[dict]:
    tok, _ = tok_model
    lines = Path(identity_files["train"]).read_text(encoding="utf-8").splitlines()[:6]
    return [encode_chat(tok, json.loads(line)["messages"]) for line in lines]


def _loss_and_grads(model, batch):
    """The loss of one batch and every parameter's gradient from it."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_conversation_sees_only_itself_inside_a_packed_row(tok_model, samples):
    _, model = tok_model
    [row] = pack(samples[:3], max_length=10_000)
    batch = Collator(pad_id=0, packed=True)([row])
    assert "attention_mask" not in batch and batch["position_ids"][0].tolist() == row["position_ids"]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for s in samples[:3]:
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            n = len(s["input_ids"])
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
        # control: the same row as one long sequence (no position reset) lets conversations mix
        mixed = model(input_ids=batch["input_ids"]).logits[0]
    n0 = len(samples[0]["input_ids"])
    assert (mixed[n0:] - packed[n0:]).abs().max() > 1e-2


def test_packed_rows_give_the_same_loss_and_gradients_as_a_batch(tok_model, samples):
    from transformers import AutoModelForCausalLM

    _, model = tok_model
    model = AutoModelForCausalLM.from_pretrained(model.name_or_path)
    model.config.use_cache = False
    plain = Collator(pad_id=0, packed=False)(samples)
    packed = Collator(pad_id=0, packed=True)(pack(samples, max_length=160))
    assert packed["input_ids"].numel() < plain["input_ids"].numel()      # no padding waste

    loss_a, grads_a = _loss_and_grads(model, plain)
    loss_b, grads_b = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-3)


def test_auto_packs_only_when_it_halves_the_rows(samples):
    packed = len(pack(samples, 1024))
    # short chats, long rows: packed when the packed run still makes MIN_STEPS optimizer steps
    assert choose_packing("auto", samples, max_length=1024, epochs=MIN_STEPS / packed)[0] is True
    longest = max(len(s["input_ids"]) for s in samples)
    assert choose_packing("auto", samples, max_length=longest)[0] is False   # one per row: no gain
    assert choose_packing(False, samples, max_length=1024) == (False, samples)
    assert choose_packing(True, samples, max_length=longest)[0] is True


def test_auto_never_packs_a_run_into_a_handful_of_steps(samples):
    """The real-model failure: 400 chats packed into 22 rows made 4 optimizer steps. auto now keeps
    such a run unpacked, and says how many steps a run makes."""
    packed = len(pack(samples, 1024))
    assert packed * 2 <= len(samples)                                        # packing would halve the rows
    assert choose_packing("auto", samples, max_length=1024, batch=16, epochs=1)[0] is False
    steps = optimizer_steps(len(samples), 16, 1)
    assert steps == -(-len(samples) // 16) and optimizer_steps(len(samples), 16, 1, max_steps=7) == 7
    assert optimizer_steps(packed, 1, MIN_STEPS / packed) >= MIN_STEPS


def test_packed_training_reaches_the_same_loss_in_fewer_passes(tiny_base, identity_files, tmp_path, tok_model):
    """Same 32 conversations, same epochs, lr and conversations per update (8): unpacked as micro-batches
    of 2 accumulated 4 times, packed as 3 rows of 256 tokens in one pass. Same loss, 4x fewer passes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.engine.config import load_config
    from trainer.engine.train import train

    tok, _ = tok_model
    lines = Path(identity_files["train"]).read_text(encoding="utf-8").splitlines()[:32]
    data = tmp_path / "identity32.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    eval_batch = Collator(tok.pad_token_id, packed=False)([encode_chat(tok, json.loads(x)["messages"]) for x in lines])

    def eval_loss(adapter=None) -> float:
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        model = PeftModel.from_pretrained(model, adapter) if adapter else model
        with torch.no_grad():
            return model.eval()(**eval_batch).loss.item()

    result = {}
    for packing, batch, accum in [("false", 2, 4), ("true", 3, 1)]:
        work = tmp_path / f"packing-{packing}"
        said = []
        cfg = load_config("tiny", {"model": str(tiny_base), "data": [str(data)], "work_dir": str(work)},
                          ["epochs=3", "lr=5e-3", "warmup_ratio=0", "max_length=256", f"packing={packing}",
                           f"batch_size={batch}", f"grad_accum={accum}", "logging_steps=1", "evaluation_inputs=[]"])
        final = train(cfg, echo=said.append)
        steps = json.loads((work / "scalars.jsonl").read_text().splitlines()[-1])["step"]
        result[packing] = {"loss": eval_loss(final), "passes": steps * accum, "said": said}
    base, plain, packed = eval_loss(), result["false"], result["true"]
    assert any("packed into" in s for s in packed["said"]) and any("not packed" in s for s in plain["said"])
    assert plain["loss"] < base - 2, (base, plain)                      # it learned something
    assert abs(packed["loss"] - plain["loss"]) < 0.1 * (base - plain["loss"]), (base, plain["loss"], packed["loss"])
    assert packed["passes"] * 2 <= plain["passes"], (packed["passes"], plain["passes"])


@pytest.mark.parametrize("packed", [True, False])
def test_compiled_runs_pad_the_short_last_batch_to_full_rows_with_the_same_loss_and_gradients(tok_model, samples, packed):
    """compile: true -> every micro-batch the Trainer's loader yields has batch_size rows (packed: of
    max_length tokens), so the short last batch of an epoch is no new shape for torch.compile; the
    added rows carry no label, so loss and gradients are exactly those of the real rows."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from trainer.engine.config import load_config
    from trainer.engine.dataset import collator_for

    rows = pack(samples, max_length=96) if packed else samples
    batch_size = 4 if len(rows) % 4 else 3
    assert len(rows) % batch_size, "the data must end in a short batch"
    cfg = load_config("tiny", sets=["compile=true", f"batch_size={batch_size}", "max_length=160"])
    model = AutoModelForCausalLM.from_pretrained(tok_model[1].name_or_path)
    model.config.use_cache = False
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=batch_size, use_cpu=True,
                             report_to=[], remove_unused_columns=False, dataloader_num_workers=0)
    shapes = {tuple(b["input_ids"].shape) for b in Trainer(
        model=model, args=args, train_dataset=rows, data_collator=collator_for(cfg, 0, packed)).get_train_dataloader()}
    if packed:
        assert shapes == {(batch_size, 160)}                   # one shape, the last batch too
    else:
        assert {s[0] for s in shapes} == {batch_size}
    plain_loader = Trainer(model=model, args=args, train_dataset=rows,
                           data_collator=collator_for(load_config("tiny"), 0, packed)).get_train_dataloader()
    assert {len(b["input_ids"]) for b in plain_loader} == {batch_size, len(rows) % batch_size}    # the control

    last = rows[len(rows) // batch_size * batch_size:]
    padded, plain = collator_for(cfg, 0, packed)(last), Collator(pad_id=0, packed=packed)(last)
    assert len(padded["input_ids"]) == batch_size and len(plain["input_ids"]) == len(last)
    assert (padded["labels"][len(last):] == -100).all()

    loss_a, grads_a = _loss_and_grads(model, plain)
    loss_b, grads_b = _loss_and_grads(model, padded)
    assert torch.isfinite(loss_b) and grads_b.keys() == grads_a.keys()
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-4)
