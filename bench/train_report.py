"""The training-speed report: ROOT/runs/*/result.json of bench/train_speed.py -> a table and ROOT/summary.json.

    python bench/train_speed.py report /tmp/bench [--baseline NAME] [--ours NAME] [--budget 24]

One line per run: tokens/s and s/step at the median timed step, the fastest and slowest timed step
(min-max; p10-p90 are in each result.json), the window mean beside them, peak GiB, MFU. Runs repeated
with `--repeats` (NAME-r1, NAME-r2, ...) get a line with each repeat's median and their spread
(max - min over the median of the medians). Then ours against the best configuration of every standard
stack within the memory budget (a repeated configuration counts by its median repeat, the lower one of
two), and the loss curves of ours and the baseline (`--baseline`, default the best plain_qlora, else
the best baseline) step by step.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from train_baselines import IMPLS


def rate(r: dict) -> float:
    """tokens/s from the median step (results written before step_stats: the window mean)."""
    return r.get("tokens_per_s_median", r["tokens_per_s"])


def repeat_groups(results: list[dict]) -> dict[str, list[dict]]:
    """NAME -> its runs: NAME-r1 ... NAME-rN from `--repeats`, or the single run NAME."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(re.sub(r"-r\d+$", "", r["name"]), []).append(r)
    return groups


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=rate)[(len(runs) - 1) // 2]


def report(root: Path, base: str | None, ours: str | None, budget: float) -> dict:
    results = [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/result.json"))]
    lines = ["tok/s, s/step: at the median timed step; min-max: the fastest and the slowest timed step; "
             "mean: tok/s over the whole window",
             f"{'run':<24}{'impl':<12}{'mb x acc':>9}{'ckpt':>5}{'cmp':>4}{'fCE':>4}{'attn':>6}{'nf4':>4}{'tok/s':>9}"
             f"{'s/step':>8}{'min-max':>14}{'mean':>9}{'peak GiB':>9}{'MFU':>7}"]
    for r in results:
        ck = "no" if not r["ckpt"] else f"{r['ckpt_fraction']:.2g}"
        spread = f"{r.get('step_s_min', 0):.3f}-{r.get('step_s_max', 0):.3f}"
        q = r.get("quantised", r["impl"] != "bf16_lora")
        lines.append(f"{r['name']:<24}{r['impl']:<12}{r['batch']:>5} x {r['accum']:<2}{ck:>5}"
                     f"{'y' if r['compile'] else '-':>4}{'y' if r['fused_loss'] else '-':>4}{r.get('attn', 'sdpa')[:5]:>6}"
                     f"{'y' if q else '-':>4}{rate(r):>9,.0f}{r.get('step_s_median', r['step_s']):>8.3f}{spread:>14}"
                     f"{r['tokens_per_s']:>9,.0f}{r['peak_gib']:>9.2f}{r['mfu']:>7.1%}")
        if r.get("note"):
            lines.append(f"  {r['name']}: {r['note']}")
    groups = repeat_groups(results)
    summary = {"runs": results, "budget_gib": budget, "spread": "min-max of the timed steps (p10-p90 in each run)",
               "repeats": {}}
    for name, runs in groups.items():
        if len(runs) > 1:
            rates = [rate(r) for r in runs]
            mid = statistics.median(rates)
            summary["repeats"][name] = {"runs": [r["name"] for r in runs], "tokens_per_s": rates,
                                        "median": mid, "spread": (max(rates) - min(rates)) / mid}
            lines.append(f"repeats {name}: " + " / ".join(f"{x:,.0f}" for x in rates) + f" tok/s -> median {mid:,.0f}, "
                         f"spread {(max(rates) - min(rates)) / mid:.1%} (max-min over the median)")

    def pick(name):
        if name is None:
            return None
        return next((r for r in results if r["name"] == name), None) or (median_run(groups[name]) if name in groups else None)

    def best(impl):      # the repeated configuration with the best median run, within the budget
        fit = [median_run(runs) for runs in groups.values()
               if runs[0]["impl"] == impl and max(r["peak_gib"] for r in runs) <= budget]
        return max(fit, key=rate) if fit else None

    b = pick(base) or best("plain_qlora") or best("baseline")
    o = pick(ours) or best("ours")
    if o:
        others = {impl: best(impl) for impl in IMPLS if best(impl)}
        summary["vs"] = {impl: {"name": r["name"], "tokens_per_s": rate(r), "speedup": rate(o) / rate(r)}
                         for impl, r in others.items()}
        if others:
            lines.append(f"within {budget:g} GiB, ours {o['name']} {rate(o):,.0f} tok/s vs " + ", ".join(
                f"{impl} {r['name']} {rate(r):,.0f} ({rate(o) / rate(r):.2f}x)" for impl, r in others.items()))
    if b and o:
        summary.update(baseline=b["name"], ours=o["name"], speedup=rate(o) / rate(b))
        n = min(len(b["losses"]), len(o["losses"]))
        if n == 0:
            summary["max_loss_diff"] = None
        else:
            diffs = [abs(x - y) for x, y in zip(b["losses"][:n], o["losses"][:n])]
            summary.update(max_loss_diff=max(diffs), steps_compared=n, first_losses=[b["losses"][0], o["losses"][0]],
                           last_losses=[b["losses"][n - 1], o["losses"][n - 1]])
        causal = [r["name"] for r in (b, o) if r.get("attn") == "causal"]
        lines.append(f"baseline {b['name']} {rate(b):,.0f} tok/s, ours {o['name']} {rate(o):,.0f} tok/s -> "
                     f"{summary['speedup']:.2f}x; loss curves max |diff| {summary.get('max_loss_diff')} over "
                     f"{summary.get('steps_compared')} steps" +
                     (f" (not the same function: {', '.join(causal)} attends across packed conversations)" if causal else ""))
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    return summary
