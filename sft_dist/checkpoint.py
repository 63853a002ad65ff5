"""Sharded checkpoints: every rank saves its ZeRO shard and RNG state, rank 0 writes a manifest of
every rank's files last, and the runtime hands the folder to its storage (Ray registers one checkpoint
from all ranks' files). A folder counts as a checkpoint only if its manifest exists and every file it
lists is there with the listed size, so a save torn by a crash is never resumed from.

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

from sft_dist.errors import UserError
from sft_dist.runtime import RunContext, all_gather
from sft_dist.storage import Location, StorageError

MANIFEST = "sft_dist_checkpoint.json"
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


def save(engine: Any, ctx: RunContext, loop_state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Save the engine (all ranks' shards), loop state and RNG, then register the checkpoint.

    Collective: every rank calls it at the same step.
    """
    staging = Path(tempfile.mkdtemp(prefix="sft_dist_checkpoint_"))
    try:
        engine.save_checkpoint(str(staging), tag=TAG, client_state={"loop_state": loop_state},
                               exclude_frozen_parameters=has_frozen_parameters(engine))
        torch.save(rng_state(), staging / f"rng_rank{ctx.rank}.pt")
        files: dict[str, int] = {}
        for rank_files in all_gather(_file_sizes(staging)):
            files.update(rank_files)
        if ctx.rank == 0:
            manifest = {"step": loop_state["step"], "world_size": ctx.world_size, "files": files,
                        "metrics": metrics, **loop_state}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        ctx.report_checkpoint(staging, folder_name(loop_state["step"]), metrics)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def universal_copy(folder: Location | Path, ctx: RunContext) -> Location:
    """A copy of `folder` in DeepSpeed's universal format, which loads at any world size.

    Collective: rank 0 converts (once; the manifest copied last marks a finished conversion) into
    `.universal/` beside the checkpoint, on the same storage, while the others wait. In an object store
    rank 0 converts a local copy of every file and uploads the result; each rank then loads from it.
    """
    folder = Location.of(folder)
    out = folder.parent.join(".universal", folder.name)
    if ctx.rank == 0 and not out.join(MANIFEST).is_file():
        out.delete()
        with local_copy(folder) as source:
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
    # The manifest, copied last, marks a finished conversion; it lists the universal files.
    manifest = {**json.loads((source / MANIFEST).read_text()), "files": _file_sizes(out)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


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
            return source
        found = complete_checkpoints(source)
    except StorageError as err:
        raise UserError(str(err), file=str(source)) from None
    if not found:
        raise UserError("no complete checkpoint in this run folder; a run saves them with checkpoint.every_steps "
                        "(e.g. --set checkpoint.every_steps=100; it also saves at the end)", file=str(source))
    return best(found) or found[-1]


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
