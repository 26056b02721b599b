"""The probe's shards, written and read in one place: safetensors files `shard-00000.safetensors`, ... in probe order,
each holding `h` (rows, d) float32 and each row's `user` and `position` (rows,) int64, in a `common.storage.ShardStore`
(the probe folder itself, or the local path or pyarrow filesystem URI given with `--activations`).

Every reader goes through pyarrow's file interface, so a shard on S3 or HDFS is read like a local one: a shard's
header (an 8-byte length, then JSON) gives each tensor's dtype, shape and byte range, so rows [start, end) of a
tensor are one ranged read, and the same parser decodes a whole shard Ray Data read as bytes. `ProbeShards` is a
verified probe's shards with their headers; it pickles, so Ray workers read their rows without verifying the probe
again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow
import torch
from safetensors.numpy import save

from recsae_core.common.artifacts import atomic_folder, write_json
from recsae_core.common.errors import ArtifactError, ConfigError
from recsae_core.common.layout import PROBE_ACTIVATIONS, PROBE_META, PROBE_SHARD_FILES, verify_probe_folder
from recsae_core.common.storage import ShardStore, recorded_store

SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")
"""What the writer names shards (`shard-{index:05d}.safetensors`)."""
COLUMNS = {"h": 2, "user": 1, "position": 1}
"""The tensors of a shard and their dimensions; all have the shard's rows."""
DTYPES = {"F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8"}
"""safetensors dtype names -> numpy dtypes (little-endian, as the format stores them)."""
MAX_HEADER = 1 << 20
"""A shard header longer than this is corrupt (three tensors take about 200 bytes)."""


class Column(NamedTuple):
    """Where one tensor of a shard lies."""

    dtype: str
    """Its numpy dtype."""
    shape: tuple[int, ...]
    """Its shape; the first axis is the shard's rows."""
    offset: int
    """Byte offset of its first element in the file."""

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * np.dtype(self.dtype).itemsize


class ShardHeader(NamedTuple):
    """A shard's name, its columns and its row count, read from its header."""

    name: str
    """The shard's file name."""
    columns: dict[str, Column]
    """COLUMNS -> where each lies."""
    rows: int
    """Rows of every column."""


def read_header(handle: pyarrow.NativeFile, name: str, where: str) -> ShardHeader:
    """A shard's header, checked against COLUMNS and the file's size (ArtifactError naming `where` otherwise)."""

    def corrupt(why: str) -> ArtifactError:
        return ArtifactError(f"{where}: not a probe shard ({why})")

    size = handle.size()
    length = int.from_bytes(handle.read_at(8, 0), "little") if size >= 8 else -1
    if not 0 < length <= min(MAX_HEADER, size - 8):
        raise corrupt("no safetensors header")
    try:
        header = json.loads(handle.read_at(length, 8))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise corrupt("header is not JSON") from None
    columns = {}
    for column, dims in COLUMNS.items():
        entry = header.get(column) if isinstance(header, dict) else None
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            raise corrupt(f"no tensor '{column}' of a known dtype")
        shape, span = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) == dims and all(isinstance(n, int) and n >= 0 for n in shape)
                and isinstance(span, list) and len(span) == 2 and all(isinstance(n, int) for n in span)):  # fmt: skip
            raise corrupt(f"'{column}' should have {dims} dimensions and a byte range")
        dtype = DTYPES[entry["dtype"]]
        start, end = 8 + length + span[0], 8 + length + span[1]
        if end - start != math.prod(shape) * np.dtype(dtype).itemsize or start < 8 + length or end > size:
            raise corrupt(f"'{column}' has a byte range that does not fit its shape or the file")
        columns[column] = Column(dtype, tuple(shape), start)
    rows = {column.shape[0] for column in columns.values()}
    if len(rows) != 1:
        raise corrupt("its tensors have different row counts")
    return ShardHeader(name, columns, rows.pop())


def read_column(handle: pyarrow.NativeFile, column: Column, start: int, end: int, where: str) -> np.ndarray:
    """Rows [start, end) of one column: one ranged read, straight into the array returned."""
    out = np.empty((end - start, *column.shape[1:]), dtype=column.dtype)
    handle.seek(column.offset + start * column.row_bytes)
    if out.nbytes and handle.readinto(memoryview(out).cast("B")) != out.nbytes:
        raise ArtifactError(f"{where}: shorter than its header says (truncated)")
    return out


@dataclass(frozen=True)
class ProbeShards:
    """A verified probe's shards: where they are and what each holds."""

    folder: Path
    """The probe folder (its meta and completion record)."""
    store: ShardStore
    """Where the shards are: the folder itself, or the location its meta records."""
    headers: tuple[ShardHeader, ...]
    """Each shard's header, in probe order."""

    @property
    def offsets(self) -> np.ndarray:
        """(shards + 1,) the first row of each shard, then the row count."""
        return np.concatenate([[0], np.cumsum([header.rows for header in self.headers])]).astype(np.int64)

    @property
    def n_rows(self) -> int:
        return int(sum(header.rows for header in self.headers))

    def paths(self) -> list[str]:
        """The shards' paths on `store.filesystem` (for Ray Data's readers, with `filesystem=`)."""
        return [self.store.path(header.name) for header in self.headers]

    def read_all(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Every sample's h (N, d) float32, user and position, in probe order."""
        parts: dict[str, list[np.ndarray]] = {column: [] for column in COLUMNS}
        for header in self.headers:
            with self._open(header) as handle:
                for column, part in parts.items():
                    part.append(read_column(handle, header.columns[column], 0, header.rows, self._where(header)))
        h, users, positions = (np.concatenate(parts[column]) for column in COLUMNS)
        return torch.from_numpy(h.astype(np.float32, copy=False)), users, positions

    def read_rows(self, start: int, end: int, column: str = "h") -> np.ndarray:
        """Rows [start, end) of a column across shards; only those rows are read."""
        offsets, parts = self.offsets, []
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        for index in range(max(first, 0), len(self.headers)):
            lo, hi = max(start, offsets[index]), min(end, offsets[index + 1])
            if lo >= hi:
                break
            header = self.headers[index]
            with self._open(header) as handle:
                parts.append(read_column(handle, header.columns[column], int(lo - offsets[index]),
                                         int(hi - offsets[index]), self._where(header)))  # fmt: skip
        if sum(len(part) for part in parts) != max(end - start, 0):
            raise ConfigError(f"rows [{start}, {end}) are outside the probe's {self.n_rows}")
        return np.concatenate(parts) if parts else np.zeros((0, *self.headers[0].columns[column].shape[1:]))

    def _where(self, header: ShardHeader) -> str:
        return self.store.where(header.name)

    @contextlib.contextmanager
    def _open(self, header: ShardHeader) -> Iterator[pyarrow.NativeFile]:
        handle = self.store.open(header.name)
        try:
            yield handle
        finally:
            handle.close()


class ShardRows:
    """A probe's h, shard after shard, read afresh on every pass: the SAE stage's `Activations` without holding them
    all in memory (one shard at a time)."""

    def __init__(self, probe: ProbeShards) -> None:
        self.probe = probe

    @property
    def n_rows(self) -> int:
        return self.probe.n_rows

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start, end in itertools.pairwise(self.probe.offsets):
            yield torch.from_numpy(self.probe.read_rows(int(start), int(end)).astype(np.float32, copy=False))


def open_probe(folder: Path) -> ProbeShards:
    """A probe folder's shards, once the folder and its shards are verified (`layout.verify_probe_folder`)."""
    return probe_shards(folder, verify_probe_folder(folder))


def probe_shards(folder: Path, meta: dict[str, Any]) -> ProbeShards:
    """The shards of the probe folder whose meta `verify_probe_folder` (or `RunLayout.verify_probe`) just returned,
    without verifying them again; their headers are read here (ArtifactError when they do not add up)."""
    location = meta.get(PROBE_ACTIVATIONS)
    store = recorded_store(location, folder / PROBE_META) if location else ShardStore.local(folder)
    headers = []
    for name in meta["shards"]:
        with contextlib.closing(store.open(name)) as handle:
            headers.append(read_header(handle, name, store.where(name)))
    probe = ProbeShards(folder, store, tuple(headers))
    if probe.n_rows != meta.get("n_samples"):
        raise ArtifactError(f"{folder / PROBE_META}: shards do not add up to n_samples={meta.get('n_samples')}")
    return probe


def as_probe(probe: Path | ProbeShards) -> ProbeShards:
    """A probe folder opened (and verified), or shards already opened."""
    return probe if isinstance(probe, ProbeShards) else open_probe(Path(probe))


class LeaveOut(NamedTuple):
    """Rows of a probe that a reader of whole shards drops, by their row number in the probe (an import's held-out
    rows, which its SAE is selected on and never trained on)."""

    first_rows: dict[str, int]
    """Each shard's name -> the probe row number of its first row."""
    rows: np.ndarray
    """The probe row numbers left out, sorted."""

    @classmethod
    def of(cls, probe: ProbeShards, rows: np.ndarray) -> LeaveOut:
        starts = probe.offsets[:-1]
        return cls({header.name: int(start) for header, start in zip(probe.headers, starts, strict=True)},
                   np.sort(np.asarray(rows, dtype=np.int64)))  # fmt: skip

    def kept(self, shard: str, n_rows: int) -> np.ndarray:
        """(n_rows,) bool: which rows of `shard` stay."""
        numbers = np.arange(self.first_rows[shard], self.first_rows[shard] + n_rows)
        return ~np.isin(numbers, self.rows, assume_unique=True)


def h_of_shard_bytes(batch: dict[str, np.ndarray], leave_out: LeaveOut | None = None) -> dict[str, np.ndarray]:
    """Ray Data: rows of `read_binary_files(..., include_paths=True)` over shards -> their h, float32 (without the
    rows `leave_out` names)."""
    parts = []
    for data, path in zip(batch["bytes"], batch["path"], strict=True):
        handle = pyarrow.BufferReader(data)
        name = Path(path).name
        header = read_header(handle, name, str(path))
        h = read_column(handle, header.columns["h"], 0, header.rows, str(path))
        parts.append(h if leave_out is None else h[leave_out.kept(name, header.rows)])
    return {"h": np.concatenate(parts).astype(np.float32, copy=False)}


class ShardWriter:
    """Buffers rows and writes fixed-size shards to a store, so memory stays bounded by one shard; records each
    shard's sha256 and size as written."""

    def __init__(self, store: ShardStore, rows_per_shard: int) -> None:
        self.store, self.rows_per_shard = store, rows_per_shard
        self.buffer: dict[str, list[np.ndarray]] = {}
        self.buffered, self.total, self.d = 0, 0, 0
        self.files: dict[str, dict[str, Any]] = {}

    @property
    def shards(self) -> list[str]:
        return list(self.files)

    def add(self, h: np.ndarray, user: np.ndarray, position: np.ndarray) -> None:
        for name, values in {"h": h, "user": user, "position": position}.items():
            self.buffer.setdefault(name, []).append(values)
        self.buffered += len(h)
        self.d = h.shape[1]
        while self.buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        joined = {name: np.concatenate(parts) for name, parts in self.buffer.items()}
        name = f"shard-{len(self.files):05d}.safetensors"
        data = save({k: np.ascontiguousarray(v[:rows]) for k, v in joined.items()})
        self.store.write_atomic(name, data)
        self.files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        self.buffer = {k: [v[rows:]] for k, v in joined.items()}
        self.buffered -= rows
        self.total += rows

    def close(self) -> list[str]:
        if self.buffered:
            self._flush(self.buffered)
        return self.shards


@contextlib.contextmanager
def writing_probe(folder: Path, rows_per_shard: int, about: dict[str, Any],
                  activations: ShardStore | None = None) -> Iterator[ShardWriter]:  # fmt: skip
    """A probe folder written atomically (`atomic_folder`): the caller adds rows to the writer yielded; on leaving,
    its meta is written (sample count, width, shards, then `about`) and the folder put in place with its record.
    The shards go into the folder, or to `activations`, and then the meta records its URI and each shard's sha256
    and size (shards of an earlier probe there, and temp files of killed writes, are removed): the folder is put in
    place after the last shard, so a probe cut short never reads as complete."""
    if activations is not None:
        activations.refuse_inside(folder)
    with atomic_folder(folder) as temp:
        writer = ShardWriter(activations or ShardStore.local(temp), rows_per_shard)
        yield writer
        shards = writer.close()
        meta = {"n_samples": writer.total, "d": writer.d, "shards": shards, **about}
        if activations is not None:
            meta |= {PROBE_ACTIVATIONS: activations.uri, PROBE_SHARD_FILES: writer.files}
        write_json(temp / PROBE_META, meta)
    if activations is not None:  # once the new probe is in place: the old one's shards are no longer listed
        for name in activations.names():
            ours = SHARD_NAME.fullmatch(name) or (name.startswith(".shard-") and name.endswith(".tmp"))
            if ours and name not in writer.files:
                activations.remove(name)
