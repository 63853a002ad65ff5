"""The learning-rate range test (`sft-dist lr-find`): train briefly while the learning rate grows
geometrically from `--lr-min` to `--lr-max`, on the real distributed setup, and read a learning rate
off the smoothed loss curve.

The sweep runs as its own run (folder `lr-find-...`, no checkpoints), so nothing of it reaches any
checkpoint of a real run. The workers stop together once the smoothed loss diverges (the loss they
judge is the all-reduced one, the same number on every rank). This module is pure: the loop asks it
whether the loss diverged, the driver asks it for a suggestion and a plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from sft_dist.atomic_files import replacing

SMOOTHING = 0.9  # exponential moving average of the loss, bias-corrected (as fastai's LR finder does)
DIVERGED = 4.0  # the smoothed loss this many times its best: stop


def smoothed(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    out, average = [], 0.0
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return out


@dataclass
class Divergence:
    """Watches the training loss of the sweep; True once the smoothed loss leaves DIVERGED x its best."""

    losses: list[float] = field(default_factory=list)

    def update(self, loss: float | None) -> bool:
        if loss is None:
            return False
        self.losses.append(loss)
        curve = smoothed(self.losses)
        return not math.isfinite(loss) or curve[-1] > DIVERGED * min(curve)


def suggestions(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """Two usual readings of the curve: the steepest descent of the smoothed loss (against log lr), and
    a tenth of the learning rate at its minimum."""
    curve = smoothed(losses)
    slopes = [(curve[i + 1] - curve[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)]
    steepest = min(range(len(slopes)), key=slopes.__getitem__) if slopes else 0
    lowest = min(range(len(curve)), key=curve.__getitem__)
    return {"steepest": lrs[steepest], "minimum_over_10": lrs[lowest] / 10}


def plot(lrs: list[float], losses: list[float], marks: dict[str, float], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(lrs, losses, alpha=0.3, label="loss")
    axes.plot(lrs, smoothed(losses), label="smoothed loss")
    for (name, lr), colour in zip(marks.items(), ("tab:red", "tab:green")):
        axes.axvline(lr, color=colour, linestyle="--", label=f"{name}: {lr:.2e}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    axes.set_ylim(min(losses) * 0.9, losses[0] * 1.5)  # the divergence at the end would flatten the rest
    axes.legend()
    figure.tight_layout()
    with replacing(out) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    return out
