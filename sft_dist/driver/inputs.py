"""The driver's checks of what a run needs beyond a valid config, made before any data is read or Ray
starts, each failing as one line (exit 2): an output_dir that can hold the run, a run folder that is
not taken, a model folder that is a model (config and weights), and a reachable hub (or a cached copy)
for hub names.

Light on purpose (no torch, transformers or datasets): a bad input is reported in well under a second.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from sft_dist.config import ModelConfig, RunConfig
from sft_dist.errors import UserError
from sft_dist.local_paths import is_local_source, looks_like_local_model

# The weight files `from_pretrained` reads (transformers.utils.constants names them; single files, shards
# and their indexes all end so); a GGUF model has its weights in model.gguf_file.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".pt", ".pth")
HUB_TIMEOUT_S = 3.0


def check(cfg: RunConfig, *, fresh_run: bool, needs_weights: bool) -> None:
    """All of the checks; `fresh_run`: the run folder must not exist yet (not --resume auto)."""
    check_output_dir(cfg.output_dir)
    if fresh_run:
        check_run_folder_free(cfg)
    check_model_folder(cfg.model, needs_weights)
    check_hub_reachable(cfg)


def check_output_dir(output_dir: str) -> None:
    """output_dir, or its nearest existing parent, must be a folder this process can write to."""
    path = Path(output_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise UserError(f"{output_dir} {what}; set output_dir to a folder", key="output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{existing} is not writable by this user; set output_dir to a folder you can write",
                        key="output_dir")


def check_run_folder_free(cfg: RunConfig) -> None:
    run_dir = cfg.run_dir()
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(f"run folder {run_dir} already exists; choose another run_name (or leave it unset), "
                        "or continue it with --resume auto", key="run_name")


def check_model_folder(model: ModelConfig, needs_weights: bool) -> None:
    """A local model folder holds a config (or the GGUF file that carries it) and, for training, weights."""
    if not looks_like_local_model(model.name_or_path):
        return
    folder = Path(model.name_or_path).expanduser()
    if model.gguf_file:
        return  # local_paths checked that the GGUF file is there; it holds config, tokenizer and weights
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder "
                        "(save one with save_pretrained, or give a hub name)", key="model.name_or_path")
    if needs_weights and not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file()):
        raise UserError(f"{folder} has no weights (no *.safetensors or *.bin file): a model folder needs "
                        "the files save_pretrained writes", key="model.name_or_path")


def check_hub_reachable(cfg: RunConfig) -> None:
    """Hub names need the Hub or a cached copy. An unreachable Hub switches this process (and the Ray it
    starts) to offline mode, so the libraries read their cache at once instead of retrying for a minute;
    a model that is not cached then is refused here."""
    model_on_hub = not looks_like_local_model(cfg.model.name_or_path)
    data_on_hub = [s.path for s in cfg.data.train_sources() + cfg.data.eval_sources() if not is_local_source(s.path)]
    if not (model_on_hub or data_on_hub):
        return
    if not _offline() and not _reachable(_endpoint()):
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub, transformers and datasets on import
        print(f"note: the Hugging Face Hub ({_endpoint()}) is unreachable: using the local cache only", flush=True)
    if model_on_hub and _offline() and not _cached(cfg.model.name_or_path):
        raise UserError(f"{cfg.model.name_or_path!r} is a hub name, the Hub is not reachable (or HF_HUB_OFFLINE is "
                        "set) and it is not in the local cache; download it where there is network, or point "
                        "model.name_or_path at a local folder", key="model.name_or_path")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _reachable(url: str) -> bool:
    """A TCP connection to the endpoint (or to the HTTPS proxy, when one is set) within HUB_TIMEOUT_S."""
    parsed = urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urlparse(proxy if "://" in proxy else f"http://{proxy}") if proxy else parsed
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache  # after the offline switch: it reads it on import

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
