"""Checkpoints as storage sees them, without DeepSpeed (the driver and export's choice import only this):
folder names, the completion manifest, which folders are complete, the best one, retention, and the
records and config a checkpoint carries. Saving and loading the engine is sft_dist.worker.checkpoint's.

A folder counts as a checkpoint only if its manifest exists and every file it lists is there with the
listed size, so a save torn by a crash is never resumed from. Checkpoints are found by scanning the
storage (a local folder or an object store alike), never by trusting Ray's registry alone: a worker
that dies right after a save takes that save's registration with it, while its files may be complete
in storage. A checkpoint in an object store is loaded from a local copy of the files the loading rank needs.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sft_dist import safe_loading
from sft_dist.config import RunConfig
from sft_dist.errors import UserError
from sft_dist.records import LoopState
from sft_dist.storage import Location, StorageError

MANIFEST = "sft_dist_checkpoint.json"
RECORDS = "records.jsonl"  # rank 0's training, validation and sample records up to the checkpoint's step
TAG = "state"  # DeepSpeed's sub-folder for the engine's files
NAME = re.compile(r"checkpoint_step_(\d+)$")
# Files that belong to one data-parallel rank: DeepSpeed's ZeRO partitions (and the per-rank RNG states that
# checkpoints held before each micro-batch seeded its own).
RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)\D")
# Each checkpoint's metrics carry a retention score, higher is better, by which Ray's CheckpointConfig
# keeps the best; one saved without a validation at its step ranks below every validated one.
SCORE = "checkpoint_score"
UNSCORED = -1e30


@dataclass(frozen=True)
class Manifest:
    """A checkpoint's completion manifest (MANIFEST), with one JSON form (the keys it has always had): the
    files and their sizes that make it whole, the world size it was saved at, the metrics reported with it
    (its SCORE among them), the loop state to resume from, and for a universal copy the source's files."""

    world_size: int
    files: dict[str, int]
    metrics: dict[str, Any]
    loop: LoopState
    source_files: dict[str, int] | None = None  # a universal copy: the files of the checkpoint it was made from

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def score(self) -> float:
        """Higher is better; UNSCORED: saved without a validation at its step."""
        return self.metrics.get(SCORE, UNSCORED)

    def universal(self, files: dict[str, int]) -> Manifest:
        """The manifest of this checkpoint's universal copy, made of `files`."""
        return replace(self, files=files, source_files=self.files)

    def to_json(self) -> dict[str, Any]:
        loop = self.loop.to_json()
        saved = {"step": loop.pop("step"), "world_size": self.world_size, "files": self.files,
                 "metrics": self.metrics, **loop}
        if self.source_files is not None:
            saved["source_files"] = self.source_files
        return saved

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> Manifest:
        return cls(saved["world_size"], saved["files"], saved.get("metrics", {}), LoopState.from_json(saved),
                   saved.get("source_files"))


def folder_name(step: int) -> str:
    return f"checkpoint_step_{step:07d}"


@contextmanager
def local_copy(folder: Location | Path, rank: int | None = None) -> Iterator[Path]:
    """The checkpoint as a local folder: itself when it is one, else a temporary copy of the files that
    `rank` loads (its own ZeRO partition and RNG state and the shared files; all files for None: a
    consolidation or a conversion reads every rank's), removed afterwards."""
    folder = Location.of(folder)
    if not folder.is_remote:
        yield folder.local_path()
        return
    files = read_manifest(folder).files
    wanted = [name for name in files if rank is None or _rank_of(name) in (None, rank)]
    scratch = Path(tempfile.mkdtemp(prefix="sft_dist_fetched_"))
    target = scratch / folder.name  # keeps the checkpoint's name, which marks it as one
    try:
        folder.download(target, [*wanted, MANIFEST])
        yield target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _rank_of(name: str) -> int | None:
    found = RANK_FILE.search(Path(name).name)
    return int(found.group(1)) if found else None


def read_records(folder: Location | Path) -> list[dict[str, Any]]:
    """The records a checkpoint carries (none in a checkpoint saved before records were kept)."""
    path = Location.of(folder).join(RECORDS)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def read_manifest(folder: Location | Path) -> Manifest:
    return Manifest.from_json(Location.of(folder).join(MANIFEST).read_json())


def problem(folder: Location | Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None if it is (one listing, also in an object store)."""
    folder = Location.of(folder)
    present = folder.files()
    if MANIFEST not in present:
        return "no completion manifest (the save did not finish)"
    try:
        files = read_manifest(folder).files
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    for name, size in files.items():
        if name not in present:
            return f"missing {name}"
        if present[name] != size:
            return f"{name} is {present[name]} bytes, expected {size} (truncated?)"
    return None


def complete_checkpoints(parent: Location | Path, log: Any = print) -> list[Location]:
    """Complete checkpoint folders under `parent`, oldest first; torn ones are named and skipped."""
    found = []
    for folder in (f for f in Location.of(parent).folders() if NAME.search(f.name)):
        reason = problem(folder)
        if reason:
            log(f"skipping checkpoint {folder}: {reason}")
        else:
            found.append(folder)
    return found


def best(found: list[Location]) -> Location | None:
    """The checkpoint with the best validation score (the newest of equals); None if none was validated."""
    scores = {f: read_manifest(f).score for f in found}
    scored = [f for f in found if scores[f] > UNSCORED]
    return max(scored, key=lambda f: (scores[f], f.name)) if scored else None


def choose(source: Location | Path | str) -> Location:
    """`source` itself if it is a checkpoint folder; in a run folder its best checkpoint, else its latest."""
    source = Location.of(source, key="checkpoint")
    try:
        if not source.exists():
            raise UserError("no such checkpoint or run folder", file=str(source))
        if NAME.search(source.name):
            reason = problem(source)
            if reason:
                raise UserError(f"not a complete checkpoint: {reason}", file=str(source))
            chosen = source
        else:
            found = complete_checkpoints(source)
            if not found:
                raise UserError("no complete checkpoint in this run folder; a run saves them with "
                                "checkpoint.every_steps (e.g. --set checkpoint.every_steps=100; it also saves at "
                                "the end)", file=str(source))
            chosen = best(found) or found[-1]
    except StorageError as err:
        raise UserError(str(err), file=str(source)) from None
    if not chosen.is_remote:  # a checkpoint in an object store is checked in the local copy that loads it
        safe_loading.refuse_unsafe(chosen.local_path())
    return chosen


def saved_config(folder: Location | Path, trust_remote_code: bool) -> RunConfig:
    """The run config saved with a checkpoint, with model.trust_remote_code as this command says: a
    checkpoint (perhaps someone else's) never switches remote code on by itself."""
    cfg = RunConfig.model_validate(read_manifest(folder).loop.config)
    if cfg.model.trust_remote_code and not trust_remote_code:
        raise UserError("the checkpoint's config sets model.trust_remote_code, which runs the model folder's own "
                        "Python code; pass --trust-remote-code if you trust that code",
                        file=str(Location.of(folder).join(MANIFEST)))
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"trust_remote_code": trust_remote_code})})


def prune(parent: Location | Path, keep: int) -> None:
    """Delete the complete checkpoints under `parent` that Ray's CheckpointConfig(num_to_keep=keep, by
    SCORE) would: all but the `keep` best-scored (ties: the newest) and the latest. Runs without Ray
    have no checkpoint manager to do it."""
    found = complete_checkpoints(parent, log=lambda _: None)
    ranked = sorted(found, key=lambda f: (read_manifest(f).score, f.name))
    kept = set(ranked[-keep:]) | set(found[-1:])
    for folder in found:
        if folder not in kept:
            folder.delete()
