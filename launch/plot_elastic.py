"""The README's elastic picture: an elastic run's training loss over an uninterrupted run's, with the
steps shaded by the world size that trained them (from each run's metrics.jsonl).

    python launch/plot_elastic.py ELASTIC_RUN_DIR UNINTERRUPTED_RUN_DIR OUT.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sft_dist.driver.plots import read_metrics  # noqa: E402


def main(elastic: Path, uninterrupted: Path, out: Path) -> None:
    train, _ = read_metrics(elastic)
    reference, _ = read_metrics(uninterrupted)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for record in train:  # one band per step, shaded by its world size
        ax.axvspan(record["step"] - 0.5, record["step"] + 0.5, color="#dbe9f6" if record["world_size"] == 1
                   else "#ffffff", lw=0)
    ax.plot([r["step"] for r in reference], [r["loss"] for r in reference], color="#999999", lw=4,
            label="uninterrupted, 2 workers")
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="#c0392b", lw=1.2, marker=".",
            label="elastic: 2 -> 1 -> 2 workers (shaded: 1 worker)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
