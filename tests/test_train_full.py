"""Full fine-tuning keeps fp32 master weights when the compute dtype is bf16 (`master_fp32`, default on):
small updates land instead of rounding away, and `final/` ships in bf16, the trained weights rounded once."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.__main__ import main as cli


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def changed_share(before: dict, after: dict) -> float:
    """Share of the base's weight elements that training changed (the base in the trained dtype)."""
    changed = total = 0
    for name, old in before.items():
        new = after[name]
        changed += int((new != old.to(new.dtype)).sum())
        total += old.numel()
    return changed / total


def test_load_keeps_fp32_masters_unless_told(tiny_base):
    from inference.device import pick
    from trainer.engine.config import load_config
    from trainer.engine.train import load_model_for_training

    for master, want in (("true", torch.float32), ("false", torch.bfloat16)):
        cfg = load_config("tiny", {"model": str(tiny_base)}, ["method=full", "dtype=bf16", f"master_fp32={master}"])
        model = load_model_for_training(cfg, tiny_base, pick("cpu", "bf16"))
        assert {p.dtype for p in model.parameters()} == {want}


@pytest.fixture(scope="module")
def full_runs(tiny_base, identity_files, tmp_path_factory) -> dict:
    """3 steps at lr 1e-5 with dtype bf16, with and without fp32 master weights."""
    root = tmp_path_factory.mktemp("full")
    runs = {}
    for master in ("true", "false"):
        work = root / f"master_{master}"
        assert cli(["train", "tiny", "--model", str(tiny_base), "--data", str(identity_files["train"]),
                    "--work-dir", str(work), "--set", "method=full", "--set", "dtype=bf16",
                    "--set", f"master_fp32={master}", "--set", "lr=1e-5", "--set", "warmup_ratio=0",
                    "--set", "lr_scheduler=constant", "--set", "max_steps=3", "--set", "save_steps=3",
                    "--set", "batch_size=4", "--set", "max_length=128", "--set", "evaluation_inputs=[]"]) == 0
        runs[master] = work
    return runs


def test_small_updates_land_only_with_fp32_masters(full_runs, tiny_base):
    base = weights(tiny_base)
    with_masters = changed_share(base, weights(full_runs["true"] / "checkpoint-3"))
    bf16_only = changed_share(base, weights(full_runs["false"] / "checkpoint-3"))
    # AdamW moves every weight by ~lr a step; 3e-5 is below half a bf16 step for most weights
    assert with_masters > 0.95, with_masters
    assert bf16_only < 0.5 * with_masters, (bf16_only, with_masters)


def test_final_ships_in_bf16_as_the_masters_rounded_once(full_runs):
    from transformers import AutoConfig, AutoModelForCausalLM

    work = full_runs["true"]
    masters, final = weights(work / "checkpoint-3"), weights(work / "final")
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert masters.keys() == final.keys()
    assert all(torch.equal(final[k], masters[k].to(torch.bfloat16)) for k in masters)
    assert AutoConfig.from_pretrained(work / "final").dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(work / "final")
    assert next(model.parameters()).dtype == torch.bfloat16
