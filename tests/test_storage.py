"""Object-store locations on a real S3 API server (moto's server mode): the run name joins before pyarrow's
options, the standard endpoint variable is honoured, checkpoints are scanned and fetched per rank as from a
folder, shipped folders reach a node once, and a store that cannot be written is one line naming the key
before anything starts. No Ray here: tests/test_object_store.py runs the cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.fs
import pytest

from sft_dist import checkpoints, shipping
from sft_dist.cli import main
from sft_dist.storage import Location

from conftest import BUCKET, FAKE_SECRET, S3_CREDENTIALS, TINY_CONFIG, start_s3_server


def store_uri(endpoint: str, path: str) -> str:
    return f"s3://{BUCKET}/{path}?endpoint_override={endpoint}&scheme=http"


def read_with_pyarrow(uri: str) -> bytes:
    """The reference reader: pyarrow's own URI parsing, without our Location."""
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as source:
        return source.read()


def test_a_name_joins_the_path_before_the_options(s3_store):
    runs = Location.of(store_uri(s3_store, "join/runs"))
    probe = runs.join("runB", "probe.txt")
    assert str(probe) == store_uri(s3_store, "join/runs/runB/probe.txt")
    probe.write_text("hello")
    assert read_with_pyarrow(store_uri(s3_store, "join/runs/runB/probe.txt")) == b"hello"
    assert [f.name for f in runs.folders()] == ["runB"] and runs.join("runB").files() == {"probe.txt": 5}


def test_aws_endpoint_url_names_the_endpoint_of_an_s3_uri(s3_store, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_store}")
    Location.of(f"s3://{BUCKET}/env/probe.txt").write_text("via env")
    assert read_with_pyarrow(store_uri(s3_store, "env/probe.txt")) == b"via env"


def test_pyarrow_itself_still_ignores_aws_endpoint_url(s3_store):
    """storage.with_env_endpoint exists because of apache/arrow#49643; when this fails, remove it."""
    Location.of(store_uri(s3_store, "upstream/probe.txt")).write_text("x")
    code = ("import pyarrow.fs as f; fs = f.S3FileSystem(connect_timeout=2, request_timeout=2)\n"
            f"fs.open_input_stream('{BUCKET}/upstream/probe.txt').read()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", **S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{s3_store}"})
    assert result.returncode != 0, "pyarrow now honours AWS_ENDPOINT_URL: drop storage.with_env_endpoint"


def fake_checkpoint(folder, step: int, world_size: int, drop: str | None = None) -> None:
    """A checkpoint folder as checkpoint.save lays it out (ZeRO-3 names), its manifest listing every file."""
    files = {"state/zero_pp_rank_0_mp_rank_00_model_states.pt": 11, "latest": 5}
    for rank in range(world_size):
        files.update({f"state/zero_pp_rank_{rank}_mp_rank_00_model_states.pt": 10 + rank,
                      f"state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": 20 + rank,
                      f"rng_rank{rank}.pt": 30 + rank})
    for name, size in files.items():
        if name != drop:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"x" * size)
    (folder / checkpoints.MANIFEST).write_text(json.dumps({"step": step, "world_size": world_size, "files": files}))


def test_the_store_is_scanned_as_a_folder_is(s3_store, tmp_path):
    """The same run (one complete checkpoint, one torn by a missing shard) in a folder and in the store:
    the store's scan must agree with the local one."""
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoint_step_0000003", 3, 2)
    fake_checkpoint(run / "checkpoint_step_0000006", 6, 2, drop="state/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    remote = Location.of(store_uri(s3_store, "scan/run"))
    remote.upload(run)
    local_skips, remote_skips = [], []
    local = checkpoints.complete_checkpoints(run, log=local_skips.append)
    found = checkpoints.complete_checkpoints(remote, log=remote_skips.append)
    assert [f.name for f in found] == [f.name for f in local] == ["checkpoint_step_0000003"]
    assert len(remote_skips) == 1 and "missing state/zero_pp_rank_1_mp_rank_00_optim_states.pt" in remote_skips[0]
    assert checkpoints.choose(remote).name == "checkpoint_step_0000003"


def test_a_rank_fetches_its_own_partition_and_the_shared_files(s3_store, tmp_path):
    fake_checkpoint(tmp_path / "checkpoint_step_0000003", 3, 2)
    remote = Location.of(store_uri(s3_store, "fetch/run/checkpoint_step_0000003"))
    remote.upload(tmp_path / "checkpoint_step_0000003")
    with checkpoints.local_copy(remote, rank=1) as local:
        fetched = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert fetched == sorted([checkpoints.MANIFEST, "latest", "rng_rank1.pt",
                              "state/zero_pp_rank_1_mp_rank_00_model_states.pt",
                              "state/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    with checkpoints.local_copy(remote) as local:  # export, conversion: every file
        assert {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()} == set(
            remote.files())


def test_a_shipped_folder_reaches_a_node_once_and_a_changed_one_is_a_new_key(s3_store, tmp_path, monkeypatch):
    monkeypatch.setenv(shipping.CACHE_ENV, str(tmp_path / "node-cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.gguf").write_bytes(b"w" * 1000)
    (model / "other.gguf").write_bytes(b"o" * 1000)  # another quantization, not the configured one
    files = shipping.shipped_files(model, "weights.gguf")
    assert files == {"config.json": 2, "weights.gguf": 1000}
    key = shipping.content_key(model, files)
    remote = Location.of(store_uri(s3_store, f"ship/model/{key}"))
    shipping.upload_once(model, files, remote)
    entry = {"path": str(model), "key": key, "remote": str(remote), "files": files}
    assert shipping.node_copy("model", entry) == (model, "in place")  # the driver's own node
    elsewhere = {**entry, "path": str(tmp_path / "not-on-this-node")}
    copy, how = shipping.node_copy("model", elsewhere)
    assert how == "fetched" and (copy / "weights.gguf").read_bytes() == b"w" * 1000
    assert not (copy / "other.gguf").exists()
    assert shipping.node_copy("model", elsewhere) == (copy, "cached")
    (model / "weights.gguf").write_bytes(b"v" * 1000)  # same size, other content
    assert shipping.content_key(model, files) != key
    assert shipping.node_copy("model", entry) == (copy, "cached")  # not the stale driver folder


@pytest.fixture(scope="module")
def authenticating_store(tmp_path_factory):
    """A second server that checks credentials (moto's IAM mode): unknown or absent keys are refused."""
    server, endpoint = start_s3_server(tmp_path_factory.mktemp("s3auth"), INITIAL_NO_AUTH_ACTION_COUNT="0")
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


def closed_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("case", ["wrong endpoint", "missing bucket", "no credentials"])
def test_a_store_that_cannot_be_written_is_one_line_naming_the_key(case, s3_store, authenticating_store, tmp_path,
                                                                   capsys, monkeypatch):
    uri = {"wrong endpoint": f"s3://{BUCKET}/runs?endpoint_override={closed_port()}&scheme=http",
           "missing bucket": f"s3://no-such-bucket/runs?endpoint_override={s3_store}&scheme=http",
           "no credentials": f"s3://{BUCKET}/runs?endpoint_override={authenticating_store}&scheme=http"}[case]
    if case == "no credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
    code = main(["train", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", "run_name=r",
                 "--set", f"ray.storage_path={uri}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: ray.storage_path: cannot write to {uri.split('?')[0]}")
    assert {"wrong endpoint": "could not connect", "missing bucket": "bucket 'no-such-bucket' not found",
            "no credentials": "error"}[case] in err[0].lower()
    assert list(tmp_path.iterdir()) == []  # no run folder, and nothing prepared: refused first


def test_credentials_in_the_storage_uri_are_refused_unprinted(tmp_path, capsys):
    code = main(["train", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", "run_name=r",
                 "--set", f"ray.storage_path=s3://AKIAX:{FAKE_SECRET}@{BUCKET}/runs"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ray.storage_path: credentials in the storage URI are refused")
    assert FAKE_SECRET not in err and list(tmp_path.iterdir()) == []



def test_a_worker_failure_reaches_the_driver_as_one_line_naming_rank_and_host(s3_store):
    """What ray_worker_main raises, as launcher reports it: pydantic's multi-line errors and a storage
    failure each become one line (on main the driver printed pydantic's last line, a URL)."""
    import ray.train
    from pydantic import ValidationError

    from sft_dist.config import RunConfig
    from sft_dist.driver.launcher import _failure_message
    from sft_dist.storage import StorageError
    from sft_dist.worker.runtime import one_line

    with pytest.raises(ValidationError) as invalid:
        RunConfig.model_validate({"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "train": {"lr": -1}})
    with pytest.raises(StorageError) as unreachable:
        Location.of(store_uri(s3_store, "nothing/here.bin")).read_bytes()
    failures = {0: RuntimeError(f"rank 0 on node-a: {one_line(invalid.value)}"),
                1: RuntimeError(f"rank 1 on node-b: {one_line(unreachable.value)}")}
    message = _failure_message(ray.train.WorkerGroupError("workers failed", failures))
    assert "\n" not in message
    assert message.startswith("rank 0 on node-a: invalid config: train.lr: Input should be greater than 0; ")
    assert f"rank 1 on node-b: StorageError: cannot read s3://{BUCKET}/nothing/here.bin" in message
