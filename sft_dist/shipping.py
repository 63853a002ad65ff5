"""The driver's files on nodes that share no disk with it: the prepared (tokenized) data folder, a local
model folder (also one holding a GGUF file) and a `.jinja` chat template.

With an object-store `ray.storage_path` (or a shared mount, `ray.shared_storage: true`), the driver
copies each folder once per store to `{storage_path}/.cache/{data,model}/<content key>` (a folder already
there under its key is reused), and every worker finds it on its own node: the driver's own folder when
the node sees it with the same content; on a shared mount, the copy on the mount; else the node's cached
copy under `$SFT_DIST_CACHE_DIR/shipped` (default `~/.cache/sft_dist/shipped`), downloaded once per node and key while
the node's other workers wait. A hub name is not shipped: every node loads it from the hub, as before.
With a plain local storage path nothing is shipped: the run is on one machine.

The content key is the digest of the folder's file names, sizes and sampled contents (the same identity
the resume fingerprint uses), so a changed model or dataset is a new key and never a stale copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock

from sft_dist.config import RunConfig
from sft_dist.data.prepare import PreparedData
from sft_dist.fingerprint import sampled_digest
from sft_dist.local_paths import looks_like_local_model
from sft_dist.storage import Location

SHIPPED = ".sft_dist_shipped.json"  # written last, in the store and in a node's cache: the copy is whole
CACHE_ENV = "SFT_DIST_CACHE_DIR"
# How long a worker waits for another worker of its node to finish downloading the same folder (a
# multi-GB model over a slow link); past it the worker fails naming the folder, instead of hanging.
FETCH_WAIT_S = 3600


# ---------------------------------------------------------------- driver


def ship(cfg: RunConfig, data: PreparedData, root: Location) -> PreparedData:
    """Copy what the workers need to the storage `root` (once per content key); `data` with a `shipment`
    saying where each shipped thing is. Unchanged for storage that is this machine's own disk."""
    if not (root.is_remote or cfg.ray.shared_storage):
        return data
    folders = {"data": Path(data.train_dir).parent}
    model = cfg.model.name_or_path
    if looks_like_local_model(model) and Path(model).expanduser().is_dir():
        folders["model"] = Path(model).expanduser()
    shipment: dict[str, Any] = {}
    for kind, folder in folders.items():
        files = shipped_files(folder, cfg.model.gguf_file if kind == "model" else None)
        key = content_key(folder, files)
        remote = root.join(".cache", kind, key)
        upload_once(folder, files, remote)
        shipment[kind] = {"path": str(folder), "key": key, "remote": str(remote), "files": files}
    template = cfg.data.chat_template
    if template and template.endswith(".jinja"):  # a file on the driver: its text travels instead
        shipment["chat_template"] = Path(template).expanduser().read_text()
    return dataclasses.replace(data, shipment=shipment)


def shipped_files(folder: Path, gguf_file: str | None = None) -> dict[str, int]:
    """The folder's files (relative name -> bytes) that a node needs: of a GGUF model folder, only the
    GGUF file the config names (a download of a model's repository often holds many quantizations)."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    if gguf_file:
        files = {n: size for n, size in files.items() if not n.endswith(".gguf") or n == gguf_file}
    return files


def content_key(folder: Path, files: dict[str, int]) -> str:
    """Names, sizes and sampled digests of `files` in `folder`, as one digest."""
    identity = [[name, size, sampled_digest(folder / name)] for name, size in sorted(files.items())]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def upload_once(folder: Path, files: dict[str, int], remote: Location) -> None:
    marker = remote.join(SHIPPED)
    if marker.is_file():
        return  # shipped by an earlier run: same key, same content
    print(f"shipping {folder} to {remote} ({sum(files.values()) / 2**20:.1f} MiB, once per content)", flush=True)
    remote.upload(folder, files)
    marker.write_text(json.dumps({"files": files}))


# ---------------------------------------------------------------- worker


def on_this_node(cfg: RunConfig, data: PreparedData) -> tuple[RunConfig, PreparedData, dict[str, str]]:
    """The config and data with the shipped folders as this node has them, and how each was found
    ("in place", "cached", "fetched"). Only for loading: what a checkpoint records stays the driver's."""
    shipment = data.shipment
    if not shipment:
        return cfg, data, {}
    found = {kind: node_copy(kind, shipment[kind]) for kind in ("data", "model") if kind in shipment}
    data_dir = found["data"][0]
    data = dataclasses.replace(data, train_dir=str(data_dir / "train"),
                               eval_dir=str(data_dir / "eval") if data.eval_dir else None)
    if "model" in found:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(found["model"][0])})})
    if "chat_template" in shipment:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"chat_template": shipment["chat_template"]})})
    return cfg, data, {kind: how for kind, (_, how) in found.items()}


def node_copy(kind: str, entry: dict[str, Any]) -> tuple[Path, str]:
    """The folder on this node: the driver's path when it holds the same content, else the node's cache."""
    files = entry["files"]
    driver_folder = Path(entry["path"])
    if all((driver_folder / name).is_file() for name in files) and content_key(driver_folder, files) == entry["key"]:
        return driver_folder, "in place"
    shipped = Location.of(entry["remote"])
    if not shipped.is_remote:  # a shared mount: every node reads the copy on it
        return shipped.local_path(), "shared storage"
    cached = node_cache() / kind / entry["key"]
    if (cached / SHIPPED).is_file():
        return cached, "cached"
    cached.parent.mkdir(parents=True, exist_ok=True)
    # One download per node: the node's other workers wait on the lock, then find the finished copy.
    with FileLock(str(cached) + ".lock", timeout=FETCH_WAIT_S):
        if (cached / SHIPPED).is_file():
            return cached, "cached"
        partial = cached.with_name(f"{cached.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        Location.of(entry["remote"]).download(partial, files)
        (partial / SHIPPED).write_text(json.dumps({"files": files}))
        os.replace(partial, cached)  # the copy appears whole or not at all
    return cached, "fetched"


def node_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sft_dist") / "shipped"
