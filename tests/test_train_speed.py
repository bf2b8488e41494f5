"""bench/train_speed.py (with bench/train_baselines.py, bench/train_report.py): the per-step statistics, the
report of repeated runs, the nf4 skip on a CPU without it, and `--smoke` -- every impl, tiny, on this CPU; and
bench/cpu_train.py's `--smoke` (the real-base preset's CPU training speed, per epoch)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import train_baselines  # noqa: E402  (bench/ is a folder of scripts)
import train_report  # noqa: E402
import train_speed  # noqa: E402


def _scalars(elapsed):
    return [{"step": i + 1, "elapsed_s": t, "tokens": 100 * (i + 1), "tokens_per_s": 0, "loss": 1.0, "peak_gib": 1}
            for i, t in enumerate(elapsed)]


def test_the_median_step_is_not_moved_by_one_recompile():
    # step 1 compiles (1 s); step 4 recompiles (7 s): the window mean pays for it, the median does not
    stats = train_speed.step_stats(_scalars([1.0, 1.5, 2.0, 9.0, 9.5, 10.0]), warmup=1)
    assert stats["step_times"] == [1.0, 0.5, 0.5, 7.0, 0.5, 0.5]       # every logged step
    assert (stats["step_s_median"], stats["step_s_min"], stats["step_s_max"]) == (0.5, 0.5, 7.0)
    assert stats["tokens_per_step"] == 100 and stats["tokens_per_s_median"] == 200
    mean = train_speed.steady(_scalars([1.0, 1.5, 2.0, 9.0, 9.5, 10.0]), warmup=1)
    assert mean["tokens_per_s"] == pytest.approx(400 / 8.5)             # same window, as before
    assert stats["step_s_p10"] <= stats["step_s_median"] <= stats["step_s_p90"] <= stats["step_s_max"]


def test_the_report_groups_repeats_and_compares_ours_with_every_standard_stack(tmp_path, capsys):
    def result(name, impl, step_s, peak=10.0, attn="sdpa"):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        r = {"name": name, "impl": impl, "batch": 8, "accum": 2, "ckpt": True, "ckpt_fraction": 1.0, "compile": False,
             "fused_loss": False, "attn": attn, "peak_gib": peak, "mfu": 0.1, "tokens_per_s": 1000 / step_s,
             "step_s": step_s, "step_s_median": step_s, "step_s_min": step_s, "step_s_max": step_s,
             "tokens_per_s_median": 1000 / step_s, "losses": [2.0, 1.5]}
        (run / "result.json").write_text(json.dumps(r))

    result("pq-r1", "plain_qlora", 1.0, attn="causal")
    result("pq-r2", "plain_qlora", 0.8, attn="causal")
    result("bf-r1", "bf16_lora", 0.5)
    result("bf-r2", "bf16_lora", 0.5, peak=30.0)      # one repeat over the budget: the configuration is out
    result("ours-r1", "ours", 0.5)
    result("ours-r2", "ours", 0.4)
    summary = train_report.report(tmp_path, None, "ours", budget=24)
    out = capsys.readouterr().out
    assert summary["repeats"]["pq"]["tokens_per_s"] == [1000, 1250] and summary["repeats"]["pq"]["spread"] == pytest.approx(250 / 1125)
    assert summary["ours"] == "ours-r1" and summary["baseline"] == "pq-r1"     # median repeat: the lower of two
    assert set(summary["vs"]) == {"plain_qlora"} and summary["speedup"] == 2.0
    assert "repeats pq: 1,000 / 1,250 tok/s" in out and "not the same function: pq-r1" in out


def test_plain_qlora_names_why_it_cannot_quantise_on_this_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)        # `import bitsandbytes` raises ImportError
    ok, why = train_baselines.nf4_runs_here()
    assert not ok and why.startswith("bitsandbytes nf4 does not run on this CPU (ModuleNotFoundError")


def test_the_smoke_run_exercises_every_impl(tiny_base):
    """`--smoke`: prepare, baseline, ours, plain_qlora (twice: --repeats 2), bf16_lora with compile, report."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_speed.py"), "--smoke", "--smoke-tokenizer",
                           str(tiny_base)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke ok" in proc.stdout and "repeats pq:" in proc.stdout
    assert "RESULT pq-r1" in proc.stdout and "RESULT pq-r2" in proc.stdout and "bf16_lora: compiled 2" in proc.stdout


def test_the_cpu_training_benchmark_times_the_first_and_the_later_epochs(tmp_path):
    """bench/cpu_train.py --smoke: the real-base preset on the tiny base over two epochs, logged every step."""
    out = tmp_path / "cpu_train.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "cpu_train.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=REPO, timeout=600)
    res = json.loads(out.read_text())
    assert (res["preset"], res["steps"], res["epoch_steps"], res["hidden_cache"]) == ("smollm2_135m_lora", 6, 3, True)
    assert res["retain_kl"] > 0 and res["first_epoch_tok_s"] > 0 and res["later_epochs_tok_s"] > 0
    assert len(res["step_s"]) == 5 and res["last_loss"] > 0


def test_the_cpu_loss_benchmark_times_every_variant_of_the_fused_loss(tmp_path):
    """bench/cpu_loss.py at a small vocabulary: the cross-entropy alone, with the KL apart, sharing the logits and
    (where inductor has a C++ compiler) with compiled chunks, each timed forward and backward."""
    out = tmp_path / "cpu_loss.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "cpu_loss.py"), "--rows", "24", "--kl-rows", "10",
                    "--vocab", "512", "--repeats", "2", "--out", str(out)], check=True, cwd=REPO, timeout=600)
    res = json.loads(out.read_text())
    assert (res["rows"], res["kl_rows"], res["vocab"]) == (24, 10, 512)
    assert {"cross-entropy alone", "+ KL computed apart (before)", "+ KL sharing the logits"} <= set(res["results"])
    assert all(r["median_ms"] > 0 for r in res["results"].values())


@pytest.mark.parametrize("env, compiled", [(None, True), ("eager", False)])
def test_the_benchmarks_switch_keeps_the_loss_chunks_eager_under_compile(tiny_base, monkeypatch, env, compiled):
    """With `compile` the fused loss's chunks compile too (any device), unless the benchmarks' OWN_ASSISTANT_FUSED_CHUNKS
    says eager (bench/gpu_stages/train.sh train18 measures one against the other)."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.engine import speed

    if env is None:
        monkeypatch.delenv(speed.FUSED_CHUNKS_ENV, raising=False)
    else:
        monkeypatch.setenv(speed.FUSED_CHUNKS_ENV, env)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=4, target_modules="all-linear"))
    speed.apply_speedups(model, SimpleNamespace(compile=True, fused_loss=True))
    lm = model.get_base_model()
    assert lm.fused_loss and lm.fused_loss_compiled is compiled
