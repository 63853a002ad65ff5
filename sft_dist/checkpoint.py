"""Sharded checkpoints: every rank saves its ZeRO shard and RNG state, rank 0 writes a manifest of
every rank's files last, and the runtime hands the folder to its storage (Ray registers one checkpoint
from all ranks' files). A folder counts as a checkpoint only if its manifest exists and every file it
lists is there with the listed size, so a save torn by a crash is never resumed from.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

from sft_dist.errors import UserError
from sft_dist.runtime import RunContext, all_gather

MANIFEST = "sft_dist_checkpoint.json"
TAG = "state"  # DeepSpeed's sub-folder for the engine's files
NAME = re.compile(r"checkpoint_step_(\d+)$")
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


def load(engine: Any, ctx: RunContext, folder: Path) -> dict[str, Any]:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the saved loop state.

    Collective: every rank loads the same folder.
    """
    # A universal copy (see universal_copy) loads through the same call when the engine was built with
    # DeepSpeed's `checkpoint.load_universal`.
    # Frozen parameters are not in the checkpoint (see has_frozen_parameters): the module loads non-strictly.
    engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
                           load_module_strict=not has_frozen_parameters(engine))
    manifest = read_manifest(folder)
    rng_file = folder / f"rng_rank{ctx.rank}.pt"
    if manifest["world_size"] == ctx.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return manifest


def has_frozen_parameters(engine: Any) -> bool:
    """Frozen parameters (a LoRA run's base) are left out of checkpoints: they never change, so the
    pretrained model they were built from holds them, and a checkpoint stays the adapter's size."""
    return any(not p.requires_grad for p in engine.module.parameters())


def universal_copy(folder: Path, ctx: RunContext) -> Path:
    """A copy of `folder` in DeepSpeed's universal format, which loads at any world size.

    Collective: rank 0 converts (once; the manifest copied last marks a finished conversion) into
    `.universal/` beside the checkpoint, on the same shared storage, while the others wait.
    """
    out = folder.parent / ".universal" / folder.name
    if ctx.rank == 0 and not (out / MANIFEST).is_file():
        shutil.rmtree(out, ignore_errors=True)
        ds_to_universal(argparse.Namespace(
            input_folder=str(folder / TAG), output_folder=str(out / TAG), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True,
            # Our checkpoints carry no tensor-parallel layout info; plain data parallelism needs none.
            inject_missing_state=True,
        ))
        shutil.copy(folder / MANIFEST, out / MANIFEST)
    all_gather(None)  # a barrier: the converted files exist for every rank past this line
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None if it is."""
    if not (folder / MANIFEST).is_file():
        return "no completion manifest (the save did not finish)"
    try:
        files = read_manifest(folder)["files"]
    except (json.JSONDecodeError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def complete_checkpoints(parent: Path, log: Any = print) -> list[Path]:
    """Complete checkpoint folders under `parent`, oldest first; torn ones are named and skipped."""
    found = []
    for folder in sorted(p for p in parent.glob("checkpoint_step_*") if NAME.search(p.name)):
        reason = problem(folder)
        if reason:
            log(f"skipping checkpoint {folder}: {reason}")
        else:
            found.append(folder)
    return found


def best(found: list[Path]) -> Path | None:
    """The checkpoint with the best validation score (the newest of equals); None if none was validated."""
    scores = {f: read_manifest(f).get("metrics", {}).get(SCORE, UNSCORED) for f in found}
    scored = [f for f in found if scores[f] > UNSCORED]
    return max(scored, key=lambda f: (scores[f], f.name)) if scored else None


def choose(source: Path) -> Path:
    """`source` itself if it is a checkpoint folder; in a run folder its best checkpoint, else its latest."""
    if not source.exists():
        raise UserError("no such checkpoint or run folder", file=str(source))
    if NAME.search(source.name):
        reason = problem(source)
        if reason:
            raise UserError(f"not a complete checkpoint: {reason}", file=str(source))
        return source
    found = complete_checkpoints(source)
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
