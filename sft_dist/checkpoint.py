"""Sharded checkpoints: every rank saves its ZeRO shard and RNG state, rank 0 writes a manifest of
every rank's files last, and the runtime hands the folder to its storage (Ray registers one checkpoint
from all ranks' files). A folder counts as a checkpoint only if its manifest exists and every file it
lists is there with the listed size, so a save torn by a crash is never resumed from. Before any
rank loads a folder its pickles are checked (sft_dist.safe_loading): a checkpoint cannot run code.
A checkpoint also carries rank 0's records of the run so far (`records.jsonl`), so a driver that died
before writing them loses nothing: the resume puts them back into metrics.jsonl.

Checkpoints are found by scanning the storage (a local folder or an object store alike), never by
trusting Ray's registry alone: a worker that dies right after a save takes that save's registration
with it, while its files may be complete in storage. A checkpoint in an object store is loaded from a
local copy of the files the loading rank needs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

from sft_dist import safe_loading
from sft_dist.atomic_files import out_of_space, write_text
from sft_dist.config import RunConfig
from sft_dist.errors import UserError
from sft_dist.runtime import RunContext, all_gather
from sft_dist.storage import Location, StorageError

MANIFEST = "sft_dist_checkpoint.json"
RECORDS = "records.jsonl"  # rank 0's training, validation and sample records up to the checkpoint's step
TAG = "state"  # DeepSpeed's sub-folder for the engine's files
NAME = re.compile(r"checkpoint_step_(\d+)$")
# Files that belong to one data-parallel rank: DeepSpeed's ZeRO partitions and our RNG states.
RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)\D")
# Each checkpoint's metrics carry a retention score, higher is better, by which Ray's CheckpointConfig
# keeps the best; one saved without a validation at its step ranks below every validated one.
SCORE = "checkpoint_score"
UNSCORED = -1e30


def folder_name(step: int) -> str:
    return f"checkpoint_step_{step:07d}"


class CheckpointSaveError(RuntimeError):
    """A save that could not finish (the disk is full): the message says which step and why."""


def save(engine: Any, ctx: RunContext, loop_state: dict[str, Any], metrics: dict[str, Any],
         records: list[dict[str, Any]] = ()) -> None:
    """Save the engine (all ranks' shards), loop state, RNG and (rank 0) the run's records, then register
    the checkpoint.

    Collective: every rank calls it at the same step.
    """
    staging = Path(tempfile.mkdtemp(prefix="sft_dist_checkpoint_"))
    try:
        engine.save_checkpoint(str(staging), tag=TAG, client_state={"loop_state": loop_state},
                               exclude_frozen_parameters=has_frozen_parameters(engine))
        torch.save(rng_state(), staging / f"rng_rank{ctx.rank}.pt")
        if ctx.rank == 0:
            (staging / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))
        files: dict[str, int] = {}
        for rank_files in all_gather(_file_sizes(staging)):
            files.update(rank_files)
        if ctx.rank == 0:
            manifest = {"step": loop_state["step"], "world_size": ctx.world_size, "files": files,
                        "metrics": metrics, **loop_state}
            write_text(staging / MANIFEST, json.dumps(manifest, indent=1))
        ctx.report_checkpoint(staging, folder_name(loop_state["step"]), metrics)
    except Exception as err:
        if not out_of_space(err):
            raise
        raise CheckpointSaveError(f"no space left on device while saving checkpoint {loop_state['step']} "
                                  f"(writing {_failed_path(err)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _failed_path(err: BaseException) -> str:
    """The file a failed save was writing: shutil's copy lists (source, destination, why) per file."""
    if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) and err.args[0]:
        return str(err.args[0][0][1])
    if isinstance(err, OSError) and err.filename:
        return str(err.filename2 or err.filename)
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def load(engine: Any, ctx: RunContext, folder: Location | Path) -> dict[str, Any]:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the saved loop state.

    Collective: every rank loads the same folder.
    """
    manifest = read_manifest(folder)
    same_world = manifest["world_size"] == ctx.world_size
    with local_copy(folder, ctx.rank if same_world else None) as local:
        # A universal copy (see universal_copy) loads through the same call when the engine was built with
        # DeepSpeed's `checkpoint.load_universal`.
        # Frozen parameters are not in the checkpoint (see has_frozen_parameters): the module loads non-strictly.
        safe_loading.refuse_unsafe(local)
        engine.load_checkpoint(str(local), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
                               load_module_strict=not has_frozen_parameters(engine))
        rng_file = local / f"rng_rank{ctx.rank}.pt"
        if same_world and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    return manifest


@contextmanager
def local_copy(folder: Location | Path, rank: int | None = None) -> Iterator[Path]:
    """The checkpoint as a local folder: itself when it is one, else a temporary copy of the files that
    `rank` loads (its own ZeRO partition and RNG state and the shared files; all files for None: a
    consolidation or a conversion reads every rank's), removed afterwards."""
    folder = Location.of(folder)
    if not folder.is_remote:
        yield folder.local_path()
        return
    files = read_manifest(folder)["files"]
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


def has_frozen_parameters(engine: Any) -> bool:
    """Frozen parameters (a LoRA run's base) are left out of checkpoints: they never change, so the
    pretrained model they were built from holds them, and a checkpoint stays the adapter's size."""
    return any(not p.requires_grad for p in engine.module.parameters())


def read_records(folder: Location | Path) -> list[dict[str, Any]]:
    """The records a checkpoint carries (none in a checkpoint saved before records were kept)."""
    path = Location.of(folder).join(RECORDS)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def universal_copy(folder: Location | Path, ctx: RunContext, into: Location | Path) -> Location:
    """A copy of `folder` in DeepSpeed's universal format, which loads at any world size.

    Collective: rank 0 converts (once; the manifest copied last marks a finished conversion) into
    `into/.universal/`, the resuming run's folder (never another run's), on the storage every rank
    reads, while the others wait. A copy made from another checkpoint of the same name is redone. In an
    object store rank 0 converts a local copy of every file and uploads the result.
    """
    folder = Location.of(folder)
    out = Location.of(into).join(".universal", folder.name)
    if ctx.rank == 0 and not _converted_from(out, folder):
        out.delete()
        with local_copy(folder) as source:
            safe_loading.refuse_unsafe(source)
            converted = out.local_path() if not out.is_remote else Path(tempfile.mkdtemp(prefix="sft_dist_universal_"))
            convert_to_universal(source, converted)
            if out.is_remote:
                out.upload(converted, [n for n in _file_sizes(converted) if n != MANIFEST])
                out.upload(converted, [MANIFEST])  # last: marks the upload finished
                shutil.rmtree(converted, ignore_errors=True)
    all_gather(None)  # a barrier: the converted files exist for every rank past this line
    return out


def convert_to_universal(source: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    ds_to_universal(argparse.Namespace(
        input_folder=str(source / TAG), output_folder=str(out / TAG), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True,
        # Our checkpoints carry no tensor-parallel layout info; plain data parallelism needs none.
        inject_missing_state=True,
    ))
    if (source / RECORDS).is_file():
        shutil.copy(source / RECORDS, out / RECORDS)
    # The manifest, copied last, marks a finished conversion; it lists the universal files and, to tell
    # one checkpoint of this name from another, the source's.
    source_manifest = json.loads((source / MANIFEST).read_text())
    manifest = {**source_manifest, "files": _file_sizes(out), "source_files": source_manifest["files"]}
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))


def has_universal_copy(folder: Location | Path, into: Location | Path) -> bool:
    """Whether `universal_copy(folder, ..., into)` would find its conversion done already."""
    folder = Location.of(folder)
    return _converted_from(Location.of(into).join(".universal", folder.name), folder)


def _converted_from(out: Location, folder: Location) -> bool:
    if not out.join(MANIFEST).is_file():
        return False
    return read_manifest(out).get("source_files") == read_manifest(folder)["files"]


def read_manifest(folder: Location | Path) -> dict[str, Any]:
    return Location.of(folder).join(MANIFEST).read_json()


def problem(folder: Location | Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None if it is (one listing, also in an object store)."""
    folder = Location.of(folder)
    present = folder.files()
    if MANIFEST not in present:
        return "no completion manifest (the save did not finish)"
    try:
        files = read_manifest(folder)["files"]
    except (json.JSONDecodeError, KeyError) as err:
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
    scores = {f: read_manifest(f).get("metrics", {}).get(SCORE, UNSCORED) for f in found}
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
    cfg = RunConfig.model_validate(read_manifest(folder)["config"])
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
    ranked = sorted(found, key=lambda f: (read_manifest(f).get("metrics", {}).get(SCORE, UNSCORED), f.name))
    kept = set(ranked[-keep:]) | set(found[-1:])
    for folder in found:
        if folder not in kept:
            folder.delete()


def rng_state() -> dict[str, Any]:
    # JSON for Python's and NumPy's states keeps the file loadable with torch.load(weights_only=True).
    np_state = np.random.get_state()
    return {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = json.loads(state["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
