"""Where a run's checkpoints, probes and shipped folders live: one type for a local path and an
object-store URI alike.

A `Location` is a local path, or a URI (`s3://bucket/runs`, `gs://...`, `abfs://...`, `hdfs://...`)
whose query string carries pyarrow's own filesystem options (`?endpoint_override=host:9000&scheme=http
&region=eu-west-1`), parsed by `pyarrow.fs.FileSystem.from_uri`. Joining a name appends it to the path,
before the query. Credentials never appear in a location: each node's environment, profile or instance
role supplies them, so nothing that names a location (config.yaml, logs, manifests) can leak them.

Reading, listing and copying go through `pyarrow.fs` (what Ray Train itself uses): copies stream in
chunks, so no file passes through memory whole.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from sft_dist.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs

# Query options that would put a secret into the config; pyarrow accepts some of them.
SECRET_OPTIONS = ("access_key", "secret_key", "session_token", "account_key", "sas_token", "password", "token")
COPY_CHUNK_BYTES = 64 << 20  # Ray Train's chunk size for checkpoint transfers


class StorageError(OSError):
    """A location that could not be reached; the message names the location and pyarrow's reason."""

    def __init__(self, what: str, location: Location, reason: str):
        super().__init__(f"cannot {what} {location}: {reason}")
        self.reason = reason


def _is_uri(where: str) -> bool:  # the one "is this remote" test: everything else asks a Location
    return "://" in where


@dataclass(frozen=True)
class Location:
    base: str  # a local absolute path, or scheme://netloc/path
    query: str = ""  # pyarrow's filesystem options of a URI

    @classmethod
    def of(cls, where: str | os.PathLike | Location, key: str = "ray.storage_path") -> Location:
        """Parse a path or URI; an S3 URI without an endpoint takes AWS_ENDPOINT_URL(_S3) from this
        process's environment. Credentials in it are refused, naming `key`."""
        if isinstance(where, Location):
            return where
        text = str(where)
        if not _is_uri(text):
            return cls(str(Path(text).expanduser().absolute()))
        base, _, query = text.partition("?")
        refuse_credentials(base, query, key)
        return cls(base.rstrip("/") if not base.endswith("://") else base, with_env_endpoint(base, query))

    def __str__(self) -> str:
        return self.base + (f"?{self.query}" if self.query else "")

    @property
    def is_remote(self) -> bool:
        return _is_uri(self.base)

    @property
    def name(self) -> str:
        return self.base.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.base.rstrip("/").rsplit("/", 1)[0], self.query)

    def join(self, *names: str) -> Location:
        return Location("/".join([self.base.rstrip("/"), *[n.strip("/") for n in names]]), self.query)

    def local_path(self) -> Path:
        assert not self.is_remote, f"{self} is not a local path"
        return Path(self.base)

    # ------------------------------------------------------------ reading

    def filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """The pyarrow filesystem and the path on it (what Ray Train's RunConfig takes)."""
        if not self.is_remote:
            import pyarrow.fs

            return pyarrow.fs.LocalFileSystem(), self.base
        parts = urlsplit(self.base)
        filesystem, root = _filesystem(f"{parts.scheme}://{parts.netloc}", self.query)
        return filesystem, root.rstrip("/") + parts.path

    def info(self) -> Any:
        filesystem, path = self.filesystem()
        with self.reaching("reach"):
            return filesystem.get_file_info(path)

    def is_file(self) -> bool:
        import pyarrow.fs

        return self.info().type == pyarrow.fs.FileType.File

    def exists(self) -> bool:
        import pyarrow.fs

        return self.info().type != pyarrow.fs.FileType.NotFound

    def files(self) -> dict[str, int]:
        """Every file below this folder: relative name -> size in bytes (empty if there is no folder)."""
        import pyarrow.fs

        filesystem, path = self.filesystem()
        with self.reaching("list"):
            infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
        return {info.path[len(path):].lstrip("/"): info.size for info in infos
                if info.type == pyarrow.fs.FileType.File}

    def folders(self) -> list[Location]:
        """The folders directly below this one, by name."""
        import pyarrow.fs

        filesystem, path = self.filesystem()
        with self.reaching("list"):
            infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        return sorted((self.join(info.base_name) for info in infos if info.type == pyarrow.fs.FileType.Directory),
                      key=lambda loc: loc.name)

    def read_bytes(self) -> bytes:
        filesystem, path = self.filesystem()
        with self.reaching("read"), filesystem.open_input_stream(path) as source:
            return source.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    # ------------------------------------------------------------ writing

    def write_bytes(self, content: bytes) -> None:
        filesystem, path = self.filesystem()
        with self.reaching("write"):
            filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with filesystem.open_output_stream(path) as out:
                out.write(content)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete(self) -> None:
        """Remove this folder or file; nothing to remove is fine."""
        import pyarrow.fs

        filesystem, path = self.filesystem()
        kind = self.info().type
        with self.reaching("delete"):
            if kind == pyarrow.fs.FileType.Directory:
                filesystem.delete_dir(path)
            elif kind == pyarrow.fs.FileType.File:
                filesystem.delete_file(path)

    def upload(self, source: Path, names: Iterable[str] | None = None) -> None:
        """Copy files of the local folder `source` (all of them, or `names`) into this folder."""
        names = sorted(_local_files(source)) if names is None else list(names)
        for name in names:
            _copy(source / name, self.join(name), upload=True)

    def download(self, target: Path, names: Iterable[str] | None = None) -> None:
        """Copy files of this folder (all of them, or `names`, relative) into the local folder `target`."""
        names = sorted(self.files()) if names is None else list(names)
        for name in names:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            _copy(self.join(name), target / name, upload=False)

    @contextmanager
    def reaching(self, what: str) -> Iterator[None]:
        """pyarrow's errors as one StorageError naming this location."""
        try:
            yield
        except StorageError:
            raise
        except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) for bad options
            raise StorageError(what, self, " ".join(str(err).split())) from None


def run_location(storage_path: str, run_name: str) -> Location:
    """Where the run's checkpoints go: `ray.storage_path` (or output_dir) / run_name."""
    return Location.of(storage_path).join(run_name)


def check_reachable(root: Location, probe_name: str, key: str = "ray.storage_path") -> None:
    """Write, read back and remove a probe file in `root` (an object store): a wrong endpoint, a missing
    bucket or missing credentials is one UserError naming `key`, before any worker starts."""
    if not root.is_remote:
        return
    probe = root.join(probe_name)
    try:
        probe.write_text(probe_name)
        if probe.read_text() != probe_name:
            raise StorageError("read back", probe, "its content differs")
        probe.delete()
    except StorageError as err:
        raise UserError(f"cannot write to {root}: {err.reason} (credentials come from each node's environment, "
                        "AWS profile or instance role; "
                        "the endpoint from ?endpoint_override=HOST:PORT&scheme=http or AWS_ENDPOINT_URL)",
                        key=key) from None


# ---------------------------------------------------------------- parsing


def refuse_credentials(base: str, query: str, key: str) -> None:
    """A URI carrying a secret would be written into config.yaml, logs and manifests: refused."""
    userinfo = urlsplit(base).netloc.rpartition("@")[0]
    options = [name for name, _ in parse_qsl(query)]
    if ":" in userinfo or any(name.lower() in SECRET_OPTIONS for name in options):
        raise UserError("credentials in the storage URI are refused (they would be written into the run's "
                        "config and logs); give them through each node's environment (AWS_ACCESS_KEY_ID, "
                        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...) or an instance role", key=key)


def with_env_endpoint(base: str, query: str) -> str:
    """The query with AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL as `endpoint_override` (and `scheme`) for an
    S3 URI that names no endpoint of its own.

    Why by hand: pyarrow's S3FileSystem ignores those standard variables (apache/arrow#49643, seen in
    pyarrow 23 to 26; tests/test_storage.py fails once pyarrow honours them, and this can go). Read
    once, on the driver: the resolved location travels to the workers, whose nodes need not set it.
    """
    options = dict(parse_qsl(query))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if urlsplit(base).scheme != "s3" or "endpoint_override" in options or not endpoint:
        return query
    parts = urlsplit(endpoint if _is_uri(endpoint) else f"https://{endpoint}")
    options["endpoint_override"] = parts.netloc
    options.setdefault("scheme", parts.scheme)
    return urlencode(options, safe=":")


@functools.lru_cache(maxsize=16)
def _filesystem(prefix: str, query: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """One filesystem per bucket and options: pyarrow may look up an S3 bucket's region when it builds one."""
    import pyarrow.fs

    location = Location(prefix, query)
    with location.reaching("reach"):
        return pyarrow.fs.FileSystem.from_uri(str(location))


def _local_files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]


def _copy(source: Location | Path, target: Location | Path, upload: bool) -> None:
    """One file, streamed in chunks by pyarrow (local to local: a plain copy)."""
    import pyarrow.fs

    remote = target if upload else source
    assert isinstance(remote, Location)
    if not remote.is_remote:
        target_path = Path(str(target))
        target_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(source), target_path)
        return
    filesystem, path = remote.filesystem()
    local = pyarrow.fs.LocalFileSystem()
    with remote.reaching("upload to" if upload else "download"):
        if upload:
            filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
            # Uploads one thread at a time, as Ray Train does: pyarrow's threaded S3 uploads can
            # deadlock (apache/arrow#32372).
            pyarrow.fs.copy_files(str(source), path, source_filesystem=local, destination_filesystem=filesystem,
                                  chunk_size=COPY_CHUNK_BYTES, use_threads=False)
        else:
            pyarrow.fs.copy_files(path, str(target), source_filesystem=filesystem, destination_filesystem=local,
                                  chunk_size=COPY_CHUNK_BYTES)
