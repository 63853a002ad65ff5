"""Sharded checkpoints, the worker side (DeepSpeed): every rank saves its ZeRO shard, rank 0
writes a manifest of every rank's files last, and the runtime hands the folder to its storage (Ray
registers one checkpoint from all ranks' files). Before any rank loads a folder its pickles are checked
(sft_dist.safe_loading): a checkpoint cannot run code. A checkpoint also carries rank 0's records of the
run so far (`records.jsonl`), so a driver that died before writing them loses nothing: the resume puts
them back into metrics.jsonl. What storage knows of checkpoints (names, manifests, completeness, the
best) is sft_dist.checkpoints'.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

from sft_dist import quiet, safe_loading
from sft_dist.atomic_files import out_of_space, write_text
from sft_dist.checkpoints import MANIFEST, RECORDS, TAG, Manifest, folder_name, local_copy, read_manifest
from sft_dist.errors import RunFailure
from sft_dist.records import LoopState
from sft_dist.storage import Location
from sft_dist.worker.runtime import RunContext, all_gather
from sft_dist.worker.train_engine import TrainEngine


class CheckpointSaveError(RunFailure):
    """A save that could not finish (the disk is full): the message says which step and why."""


def save(engine: TrainEngine, ctx: RunContext, loop_state: LoopState, metrics: dict[str, Any],
         records: list[dict[str, Any]] = ()) -> None:
    """Save the engine (all ranks' shards), loop state and (rank 0) the run's records, then register
    the checkpoint.

    Collective: every rank calls it at the same step.
    """
    staging = Path(tempfile.mkdtemp(prefix="sft_dist_checkpoint_"))
    try:
        engine.save_checkpoint(str(staging), tag=TAG, client_state={"loop_state": loop_state.to_json()},
                               exclude_frozen_parameters=has_frozen_parameters(engine))
        if ctx.rank == 0:
            (staging / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))
        files: dict[str, int] = {}
        for rank_files in all_gather(_file_sizes(staging)):
            files.update(rank_files)
        if ctx.rank == 0:
            manifest = Manifest(ctx.world_size, files, metrics, loop_state)
            write_text(staging / MANIFEST, json.dumps(manifest.to_json(), indent=1))
        ctx.report_checkpoint(staging, folder_name(loop_state.step), metrics)
    except Exception as err:
        if not out_of_space(err):
            raise
        raise CheckpointSaveError(f"no space left on device while saving checkpoint {loop_state.step} "
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


def load(engine: TrainEngine, ctx: RunContext, folder: Location | Path) -> LoopState:
    """Restore engine, optimizer and scheduler; returns the saved loop state. (Random numbers need no state:
    each micro-batch seeds its own, see train.seed_micro_batch.)

    Collective: every rank loads the same folder.
    """
    manifest = read_manifest(folder)
    same_world = manifest.world_size == ctx.world_size
    with local_copy(folder, ctx.rank if same_world else None) as local:
        # A universal copy (see universal_copy) loads through the same call when the engine was built with
        # DeepSpeed's `checkpoint.load_universal`.
        # Frozen parameters are not in the checkpoint (see has_frozen_parameters): the module loads non-strictly.
        safe_loading.refuse_unsafe(local)
        engine.load_checkpoint(str(local), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
                               load_module_strict=not has_frozen_parameters(engine))
    return manifest.loop


def has_frozen_parameters(engine: TrainEngine) -> bool:
    """Frozen parameters (a LoRA run's base) are left out of checkpoints: they never change, so the
    pretrained model they were built from holds them, and a checkpoint stays the adapter's size."""
    return any(not p.requires_grad for p in engine.module.parameters())


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
    with quiet.prints_dropped():
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
    manifest = read_manifest(source).universal(_file_sizes(out))
    write_text(out / MANIFEST, json.dumps(manifest.to_json(), indent=1))


def has_universal_copy(folder: Location | Path, into: Location | Path) -> bool:
    """Whether `universal_copy(folder, ..., into)` would find its conversion done already."""
    folder = Location.of(folder)
    return _converted_from(Location.of(into).join(".universal", folder.name), folder)


def _converted_from(out: Location, folder: Location) -> bool:
    if not out.join(MANIFEST).is_file():
        return False
    return read_manifest(out).source_files == read_manifest(folder).files


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
