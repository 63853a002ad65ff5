"""The local files and folders a user's config names: which strings are local paths rather than hub
names, and whether they exist.

Checked once, on the driver, when `config.load` reads the user's file. A saved config (sent to a
worker, stored in a checkpoint, read by export) is validated without touching the filesystem: its paths
are the driver's, and the machine validating it may never see them.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sft_dist.config import RunConfig

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv", ".arrow", ".txt")


def is_local_source(path: str) -> bool:
    """A local file, glob or folder rather than a hub dataset name ("name" or "org/name")."""
    return (Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
            or any(c in path for c in "*?[") or path.endswith(DATA_SUFFIXES))


def looks_like_local_model(path: str) -> bool:
    """A model folder rather than a hub name ("org/model")."""
    return path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1


def first_problem(cfg: RunConfig) -> tuple[str, str] | None:
    """(dotted key, what is wrong) for the first local path of `cfg` that cannot be read; None if all can."""
    for key, sources in (("data.train", cfg.data.train_sources()), ("data.eval", cfg.data.eval_sources())):
        for source in sources:
            problem = source_problem(source.path)
            if problem:
                return key, problem
    return model_problem(cfg.model.name_or_path, cfg.model.gguf_file)


def source_problem(path: str) -> str | None:
    """Why a local data source cannot be read (None when it can, or when it is a hub name)."""
    if not is_local_source(path):
        return None
    if any(c in path for c in "*?["):
        matches = [p for p in glob.glob(os.path.expanduser(path), recursive=True) if p.endswith(DATA_SUFFIXES)]
        return None if matches else f"no {'/'.join(DATA_SUFFIXES)} file matches the glob {path}"
    local = Path(path).expanduser()
    if not local.exists():
        return f"file not found: {path}"
    if local.is_file() and not path.endswith(DATA_SUFFIXES):
        return f"unsupported file type {local.suffix or '(none)'}: {path} (use {', '.join(DATA_SUFFIXES)} files, " \
               "a folder of them, or a datasets save_to_disk folder)"
    return None


def model_problem(path: str, gguf_file: str | None) -> tuple[str, str] | None:
    """(key, problem) when a local model folder or its GGUF file is missing; None for hub names."""
    if not looks_like_local_model(path):
        return None
    if not Path(path).expanduser().is_dir():
        return "model.name_or_path", f"folder not found: {path} (nor is it a hub name like org/model)"
    if gguf_file and not (Path(path).expanduser() / gguf_file).is_file():
        return "model.gguf_file", f"{gguf_file} not found in {path}"
    return None
