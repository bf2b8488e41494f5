"""Plot a run's `scalars.jsonl` to `loss.png` (loss and learning rate over steps), headless.

    python -m trainer.engine.plot WORK_DIR

Called by training at every checkpoint and at the end; safe to run on a live run's directory.
"""
from __future__ import annotations

import sys
from pathlib import Path

from inference.atomic import new_file
from trainer.workdir import read_scalars


def plot_loss(work_dir) -> Path | None:
    """Write WORK_DIR/loss.png; None when there is nothing to plot yet."""
    records = read_scalars(work_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")             # no display on servers; never opens a window
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r.get("lr", 0.0) for r in records], color="tab:orange", alpha=0.6, label="lr")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.suptitle(f"{Path(work_dir).name}: step {steps[-1]}/{records[-1].get('max_steps', '?')}")
    fig.tight_layout()
    out = Path(work_dir) / "loss.png"
    with new_file(out, "wb") as f:        # a viewer polling loss.png never sees half a file
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    from inference.errors import UserError

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(__doc__)
        return 2
    out = plot_loss(args[0])
    if out is None:
        raise UserError(f"{args[0]}: no scalars.jsonl records to plot")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from inference.errors import run_cli

    sys.exit(run_cli(main))
