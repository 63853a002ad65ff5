"""The run's picture: `loss.png` in the run folder, drawn from `metrics.jsonl` when the run ends.

Two panels sharing the step axis: training loss (each logged window) with the validation loss on top,
and the learning rate below. Matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_dist.atomic_files import read_jsonl, replacing

PLOT_NAME = "loss.png"


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, validation records) of metrics.jsonl, in step order."""
    events = read_jsonl(run_dir / "metrics.jsonl")
    records = [e for e in events if not e.get("event")]
    train = sorted((e for e in records if "loss" in e), key=lambda e: e["step"])
    evals = sorted((e for e in records if "eval_loss" in e), key=lambda e: e["step"])
    return train, evals


def plot_run(run_dir: Path) -> Path | None:
    """The driver's end-of-run call: a plot that cannot be drawn is a warning, never a failed run."""
    try:
        return write_loss_plot(run_dir)
    except Exception as err:  # noqa: BLE001 - the run itself is done and recorded
        print(f"warning: could not draw {run_dir / PLOT_NAME}: {type(err).__name__}: {err}", flush=True)
        return None


def write_loss_plot(run_dir: Path, title: str | None = None) -> Path | None:
    """Draw loss and learning rate against step into `{run_dir}/loss.png`; None when nothing was logged."""
    train, evals = read_metrics(run_dir)
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: never try to open a window
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(3, 1.2),
                                         constrained_layout=True)
    if train:
        ax_loss.plot([e["step"] for e in train], [e["loss"] for e in train], color="tab:blue", lw=1.4,
                     marker="." if len(train) < 60 else None, label=f"train loss (last {train[-1]['loss']:.4f})")
    if evals:
        ax_loss.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], color="tab:orange", lw=2,
                     marker="o", label=f"eval loss (last {evals[-1]['eval_loss']:.4f})")
        best = min(evals, key=lambda e: e["eval_loss"])
        ax_loss.annotate(f"best {best['eval_loss']:.4f}", (best["step"], best["eval_loss"]),
                         textcoords="offset points", xytext=(0, 9), ha="right", color="tab:orange", fontsize=9)
    ax_loss.set_ylabel("loss (token-weighted)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")
    ax_loss.set_title(title or run_dir.name)
    lr_points = [(e["step"], e["lr"]) for e in train if "lr" in e]
    if lr_points:
        ax_lr.plot(*zip(*lr_points), color="tab:green", lw=1.4)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    out = run_dir / PLOT_NAME
    with replacing(out) as tmp:  # a full disk leaves the previous plot, never a torn one
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
