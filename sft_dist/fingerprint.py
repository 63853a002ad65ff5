"""What a checkpoint's training state depends on: the keys a resume cannot change, with their values,
stored with every checkpoint. A resume (or an `eval`) whose config differs in one of them would train
or measure something else, so it is refused naming the keys.

Computed once, on the driver: it reads the model folder, and takes the data's content digests from the
prepared data (sft_dist.data.prepare). The workers receive it with the prepared data and store it as
is, since a worker may not see the driver's files at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sft_dist.config import RunConfig
from sft_dist.local_paths import looks_like_local_model

# The world size may change (the data position is global) as long as the global batch stays the same.
RESUME_KEYS = ("seed", "model", "peft", "data", "train.micro_batch_size*grad_accum*num_workers",
               "deepspeed.stage", "train.precision")
# A model file is identified by its size and the digest of its first and last bytes: weights that
# differ anywhere differ there too (a safetensors header names every tensor and offset; the data follow),
# and a multi-GB model folder is not read whole at every start.
SAMPLED_BYTES = 1 << 20


def resume_fingerprint(cfg: RunConfig, source_digests: list[Any]) -> dict[str, Any]:
    """The values of RESUME_KEYS as JSON-able data. `source_digests`: the content of every training
    source, then every evaluation source (`prepare.PreparedData.source_digests`)."""
    dumped = cfg.model_dump(mode="json")
    train_sources, eval_sources = cfg.data.train_sources(), cfg.data.eval_sources()
    digests = iter(source_digests)
    identities = [{**s.model_dump(mode="json"), "path": next(digests)} for s in train_sources + eval_sources]
    data = {**dumped["data"], "train": identities[: len(train_sources)],
            "eval": identities[len(train_sources):] or dumped["data"]["eval"]}
    values = {
        "seed": cfg.seed, "model": {**dumped["model"], "name_or_path": model_identity(cfg.model.name_or_path)},
        "peft": dumped["peft"], "data": data,
        "train.micro_batch_size*grad_accum*num_workers": cfg.global_batch_size(),
        "deepspeed.stage": cfg.deepspeed.stage, "train.precision": cfg.train.precision,
    }
    assert tuple(values) == RESUME_KEYS
    return values


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [key for key in RESUME_KEYS if saved.get(key) != current[key]]


def model_identity(path: str) -> Any:
    """A local model folder's files by relative name, size and sampled digest (not by where they are: a Ray
    job's working directory, and every relative path in it, moves between submissions); a hub name as is."""
    folder = Path(path).expanduser()
    if not looks_like_local_model(path) or not folder.is_dir():
        return path
    return sorted([str(f.relative_to(folder)), f.stat().st_size, sampled_digest(f)]
                  for f in folder.rglob("*") if f.is_file())


def sampled_digest(file: Path) -> str:
    size = file.stat().st_size
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        digest.update(handle.read(SAMPLED_BYTES))
        if size > 2 * SAMPLED_BYTES:
            handle.seek(size - SAMPLED_BYTES)
        digest.update(handle.read())
    return digest.hexdigest()
