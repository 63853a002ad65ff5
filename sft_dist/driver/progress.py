"""The driver's progress display: one live line redrawn in place on a terminal, one line per logged
step otherwise (CI, `ray job logs`, a file). Both show step / total, epoch, loss, learning rate,
tokens/s, ETA and the last validation metric.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import TextIO

from sft_dist.records import EvalRecord, TrainRecord

TIMED_PHASES = ("data", "forward", "backward", "optimizer")  # sft_dist.worker.timing.PHASES, without importing torch


class Progress:
    """Plain mode: every message and every training record is a line of its own."""

    def __init__(self, out: TextIO | None = None):
        self.out = out  # None: whatever sys.stdout is when printing
        self.first_step: tuple[int, float] | None = None  # (step, time) of the first record since (re)start
        self.last_eval: tuple[str, float, int] | None = None  # (metric, value, step)

    def restart(self) -> None:
        """Training goes on from a checkpoint: pace the ETA from the next record."""
        self.first_step = None

    def message(self, line: str) -> None:
        print(line, file=self.stream(), flush=True)

    def evaluated(self, record: EvalRecord, line: str) -> None:
        self.last_eval = (*record.headline, record.step)
        self.message(line)

    def train(self, record: TrainRecord) -> None:
        self.message(self.line(record))

    def line(self, record: TrainRecord) -> str:
        e = record.metrics
        text = (f"train step {record.step}/{e['total_steps']} epoch {e['epoch']:.2f} loss {e['loss']:.4f} "
                f"lr {e['lr']:.2e} {throughput(e)} eta {format_duration(self.eta_s(record))}")
        if self.last_eval:
            metric, value, step = self.last_eval
            text += f" | {metric} {value:.4f} (step {step})"
        if e.get("world_size") is not None:  # an elastic run's changes show here
            text += f" | {e['world_size']} workers"
        timed = record.phase_times(TIMED_PHASES)
        if timed:  # logging.timing: mean seconds per step of each phase
            text += " | s/step " + " ".join(f"{p} {seconds:.3f}" for p, seconds in timed.items())
            if e.get("time_comm_s") is not None:  # part of backward and optimizer
                text += f" (comm {e['time_comm_s']:.3f})"
        return text

    def eta_s(self, record: TrainRecord) -> float:
        # Pace from the first logged step on, so start-up time does not inflate the estimate.
        now = time.time()
        if self.first_step is None:
            self.first_step = (record.step, now)
        done = record.step - self.first_step[0]
        total = record.metrics["total_steps"]
        return (now - self.first_step[1]) / done * (total - record.step) if done else math.nan

    def close(self) -> None:
        pass

    def stream(self) -> TextIO:
        return self.out or sys.stdout


class LiveProgress(Progress):
    """Terminal mode: the training line is redrawn in place; other messages print above it."""

    def __init__(self, out: TextIO | None = None):
        super().__init__(out)
        self.live = ""

    def message(self, line: str) -> None:
        stream = self.stream()
        stream.write("\r\033[2K" + line + "\n" + self.live)
        stream.flush()

    def train(self, record: TrainRecord) -> None:
        width = shutil.get_terminal_size((120, 20)).columns - 1
        self.live = self.line(record)[:width]
        stream = self.stream()
        stream.write("\r\033[2K" + self.live)
        stream.flush()

    def line(self, record: TrainRecord) -> str:
        e = record.metrics
        fraction = record.step / max(e["total_steps"], 1)
        bar = "#" * round(20 * fraction) + "-" * (20 - round(20 * fraction))
        text = (f"[{bar}] {record.step}/{e['total_steps']} ep {e['epoch']:.2f} | loss {e['loss']:.4f} | "
                f"lr {e['lr']:.2e} | {throughput(e, grouped=True)} | eta {format_duration(self.eta_s(record))}")
        if self.last_eval:
            metric, value, step = self.last_eval
            text += f" | {metric} {value:.4f} @{step}"
        if "world_size" in e:
            text += f" | {e['world_size']} workers"
        return text

    def close(self) -> None:
        if self.live:
            self.stream().write("\n")
            self.stream().flush()
            self.live = ""


def for_stream(out: TextIO | None = None) -> Progress:
    """The live line on a terminal, plain lines otherwise."""
    stream = out or sys.stdout
    return LiveProgress(out) if getattr(stream, "isatty", lambda: False)() else Progress(out)


def throughput(metrics: dict, grouped: bool = False) -> str:
    """Audio seconds trained per second for clips (their transcripts are a few tokens), else tokens/s;
    `grouped`: thousands separated (the live line)."""
    if "audio_s_per_s" in metrics:
        return f"{metrics['audio_s_per_s']:.1f} audio s/s"
    return f"{metrics['tokens_per_s']:{',' if grouped else ''}.0f} tok/s"


def format_duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
