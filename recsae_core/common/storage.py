"""Where the probe's activation shards live: the probe folder itself (the default), or a local path or any pyarrow
filesystem URI (`file:///abs/path`, `s3://bucket/prefix`, `gs://bucket/prefix`, `hdfs://host/path`: whatever
`pyarrow.fs.FileSystem.from_uri` resolves), so that a cluster's workers read them from shared storage.

A `ShardStore` is one folder on one pyarrow filesystem (the local one included): every shard is written and read
through it, so a shard on S3 is handled like a local one. A write goes to a temporary name and is then moved into
place (an object store's move is a copy and a delete: the final name still appears whole or not at all). The
probe's metadata and completion record stay in RUN/probe (common.layout), recording the URI and every shard's sha256
and size, which `check_shards` compares with what is stored.

Credentials are never part of a URI here: it is recorded in RUN/probe/meta.json, so they come from the environment
(AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...) of the driver and of every Ray worker.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import pyarrow
import pyarrow.fs as pafs

from recsae_core.common.artifacts import sha256_stream
from recsae_core.common.errors import ArtifactError, ConfigError

OPTION = "--activations"
"""The command-line option that names a store (messages name it, as `--ray-address` names a cluster)."""
REACH_SECONDS = 30.0
"""How long a store may take to answer the check before any work starts (a GCS client retries for 15 minutes)."""
SECRET_PARAMETERS = ("key", "secret", "token", "password", "credential")
"""URI query parameters holding credentials contain one of these (access_key, secret_key, session_token, ...)."""

T = TypeVar("T")


@dataclass
class ProbeStorage:
    """Where the probe puts its activation shards."""

    activations: str | None = None
    """Where the probe writes its activation shards: a local path or any pyarrow filesystem URI (file:///abs/path,
    s3://bucket/prefix, gs://..., hdfs://...), its metadata and completion record staying in RUN/probe (default: in
    RUN/probe)"""

    def __post_init__(self) -> None:
        if self.activations is not None and not self.activations.strip():
            raise ConfigError("ProbeStorage.activations: empty; give a local path or a pyarrow filesystem URI")


@dataclass(frozen=True)
class ShardStore:
    """A folder of shards on a pyarrow filesystem. It pickles, so Ray workers read through it too."""

    uri: str
    """The folder as recorded: an absolute local path, or the URI as given."""
    filesystem: pafs.FileSystem
    """The filesystem pyarrow resolved it to."""
    root: str
    """The folder's path on `filesystem`, without a trailing slash."""

    @classmethod
    def local(cls, folder: Path) -> ShardStore:
        folder = folder.absolute()
        return cls(str(folder), pafs.LocalFileSystem(), folder.as_posix())

    def path(self, name: str) -> str:
        """A file's path on the filesystem (what Ray Data's readers take with `filesystem=`)."""
        return f"{self.root}/{name}"

    def where(self, name: str) -> str:
        """A file as messages name it: the URI without its query, then the file name."""
        return f"{self.uri.split('?', 1)[0].rstrip('/')}/{name}"

    def refuse_inside(self, probe_folder: Path) -> None:
        """ConfigError when the store is a local folder inside `probe_folder`, which a probe replaces as a whole."""
        if isinstance(self.filesystem, pafs.LocalFileSystem) and Path(self.root).resolve().is_relative_to(
                probe_folder.resolve()):  # fmt: skip
            raise ConfigError(f"{OPTION} {self.uri}: inside the probe folder {probe_folder}, which a probe replaces; "
                              "leave the option out to keep the shards there")  # fmt: skip

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write `name` under a temporary name, then move it into place."""
        temp = self.path(f".{name}.{secrets.token_hex(6)}.tmp")  # a temp name, as common.artifacts names them
        try:
            with _io(self.where(name), "cannot write"):
                with self.filesystem.open_output_stream(temp, compression=None) as out:
                    out.write(data)
                self.filesystem.move(temp, self.path(name))
        except BaseException:
            with contextlib.suppress(OSError):
                self.filesystem.delete_file(temp)
            raise

    def open(self, name: str) -> pyarrow.NativeFile:
        """A file for random access (ArtifactError naming it when it is missing or unreadable)."""
        with _io(self.where(name), "cannot read"):
            return self.filesystem.open_input_file(self.path(name))

    def size(self, name: str) -> int | None:
        """A file's size in bytes; None when it is not there."""
        with _io(self.where(name), "cannot read"):
            info = self.filesystem.get_file_info(self.path(name))
        return info.size if info.type == pafs.FileType.File else None

    def sha256(self, name: str) -> str:
        """The hex sha256 of a file's bytes, streamed in 1 MiB blocks."""
        with (_io(self.where(name), "cannot read"),
              self.filesystem.open_input_stream(self.path(name), compression=None) as handle):  # fmt: skip
            return sha256_stream(handle)

    def names(self) -> list[str]:
        """The files directly in the folder."""
        with _io(self.uri, "cannot list"):
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)

    def remove(self, name: str) -> None:
        with _io(self.where(name), "cannot remove"):
            self.filesystem.delete_file(self.path(name))


def open_store(location: str, probe_folder: Path | None = None) -> ShardStore:
    """The store `--activations` names, checked writable (its folder is created): ConfigError, one line naming the
    option and the location, when pyarrow cannot resolve it, it carries credentials, it lies inside `probe_folder`,
    or its filesystem does not answer or refuses the folder (an unknown scheme, a missing bucket, an unreachable
    endpoint)."""
    store = _resolve(location, ConfigError, f"{OPTION} {location.strip()}")
    if probe_folder is not None:
        store.refuse_inside(probe_folder)

    def make_folder() -> pafs.FileType:
        store.filesystem.create_dir(store.root, recursive=True)
        return store.filesystem.get_file_info(store.root).type

    try:
        kind = _within(REACH_SECONDS, make_folder)
    except (OSError, pyarrow.ArrowException, TimeoutError) as err:
        raise ConfigError(f"{OPTION} {store.uri}: cannot write there ({_first_line(err)})") from None
    if kind != pafs.FileType.Directory:
        raise ConfigError(f"{OPTION} {store.uri}: not a folder")
    return store


def recorded_store(uri: str, listing: Path) -> ShardStore:
    """The store a probe's metadata (`listing`) records (ArtifactError when pyarrow cannot open it any more)."""
    return _resolve(uri, ArtifactError, f"{listing}: activations at {uri}")


def check_shards(store: ShardStore, names: list[str], recorded: Any, listing: Path) -> None:
    """Raise ArtifactError naming the first of `names` that `recorded` ({name: {"sha256", "bytes"}}, from
    `listing`) lacks, or that is missing from `store` or differs from its record."""
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{listing}: records no shard digests for its activations at {store.uri}")
    for name in names:
        entry = recorded.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(
                entry.get("sha256"), str):  # fmt: skip
            raise ArtifactError(f"{listing}: records no sha256 and size for {store.where(name)}")
        size = store.size(name)
        if size is None:
            raise ArtifactError(f"{store.where(name)}: listed in {listing} but missing")
        if size != entry["bytes"]:
            raise ArtifactError(f"{store.where(name)}: {size} bytes, {listing} records {entry['bytes']} (truncated "
                                "or modified)")  # fmt: skip
        if store.sha256(name) != entry["sha256"]:
            raise ArtifactError(f"{store.where(name)}: sha256 does not match {listing} (corrupt or modified)")


def _resolve(location: str, error: type[Exception], named: str) -> ShardStore:
    """A ShardStore for a local path or a URI, or `error` starting with `named`."""
    text = location.strip()
    if "://" not in text:  # a plain local path, relative ones included (pyarrow takes absolute ones only)
        return ShardStore.local(Path(text).expanduser())
    secret = [key for key, _ in parse_qsl(urlsplit(text).query) if any(s in key.lower() for s in SECRET_PARAMETERS)]
    if secret:  # named without its query, so the secret is not echoed
        raise error(f"{named.split('?', 1)[0]}: carries credentials ({secret[0]}); give them in the environment "
                    "instead, as the URI is recorded in RUN/probe/meta.json")  # fmt: skip
    try:
        filesystem, root = pafs.FileSystem.from_uri(text)
    except (OSError, pyarrow.ArrowException, ValueError) as err:
        raise error(f"{named}: pyarrow cannot resolve it ({_first_line(err)})") from None
    if not root.strip("/"):
        raise error(f"{named}: names no folder (give a bucket and a prefix)")
    return ShardStore(text, filesystem, root.rstrip("/"))


@contextlib.contextmanager
def _io(where: str, failing: str) -> Iterator[None]:
    """A filesystem error as one line naming the file (a missing file included)."""
    try:
        yield
    except FileNotFoundError:
        raise ArtifactError(f"{where}: missing") from None
    except (OSError, pyarrow.ArrowException) as err:
        raise ArtifactError(f"{where}: {failing} ({_first_line(err)})") from None


def _within(seconds: float, call: Callable[[], T]) -> T:
    """`call()`, or TimeoutError after `seconds`: a daemon thread, so a filesystem client that keeps retrying never
    holds up the process's exit."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the caller
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True, name="recsae-store-check")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
