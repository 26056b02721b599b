"""Writing artifacts so that a crash never leaves a half-written file or folder, and reading them back safely.

A crash here is a killed process (SIGKILL included): every file is written under a temporary name and renamed into
place, and a folder a step writes carries a completion record (`RECORD`: the sha256 of every file in it) written
last, so a later run tells a finished step from one cut short, and a finished one from one whose bytes changed since.
Power loss is not covered: nothing is fsynced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from recsae_core.common.errors import ArtifactError, IncompleteError

RECORD = "complete.json"
"""A folder's completion record: {"files": {relative path: sha256}}, written after everything it lists."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()
"""The process's umask, read once at import (reading it means setting it)."""


def usual_mode(path: str | Path, folder: bool = False) -> None:
    """Give a temp file or folder the mode a plain open() or mkdir() would have: tempfile makes them private
    (0600 / 0700), which would leave artifacts unreadable to another user, e.g. a service that mounts the bundle a
    job wrote under another uid."""
    os.chmod(path, (0o777 if folder else 0o666) & ~UMASK)


def usual_modes(folder: Path) -> None:
    """`usual_mode` on a folder and everything in it: safetensors too writes through a private temp file."""
    usual_mode(folder, folder=True)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            usual_mode(path, folder=path.is_dir())


def _is_temp(name: str) -> bool:
    """A temporary file or folder of a write that was cut short (the names this module gives them)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old"))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temp file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        usual_mode(tmp)
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove what writes killed midway left in `folder` (temp files and folders, the old folder of an interrupted
    swap); returns their names. Only for a folder no other process is writing into."""
    removed = []
    for path in folder.iterdir() if folder.is_dir() else []:
        if _is_temp(path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file (a report) through a temp file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        usual_mode(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    """Parse a JSON artifact, naming the file in any error."""
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None


@contextlib.contextmanager
def atomic_folder(target: Path, record: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename, on failure it vanishes.

    With `record`, the completion record of everything written is added last, before the rename. What an earlier,
    killed writer of `target` left beside it (its temp folder, or the old folder of an interrupted swap) is removed
    first: one writer per target at a time."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.iterdir():
        if stale.name.startswith(f".{target.name}.") and _is_temp(stale.name) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        usual_modes(tmp)
        if record:
            write_record(tmp)
        if target.exists():
            # Killed between these two renames, `target` is absent (its step reruns) and `.old` is removed by the
            # next writer.
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    with path.open("rb") as handle:
        return sha256_stream(handle)


def sha256_stream(handle: Any) -> str:
    """The hex sha256 of what a binary stream (any object with `read(n) -> bytes`) holds, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def save_tensors_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors through a temp file and a rename, like `write_json`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        usual_mode(tmp)  # after: save_file does not keep the temp file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder` as a relative POSIX path, sorted; its record and temp files left out."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and rel.as_posix() != RECORD and not any(_is_temp(part) for part in rel.parts):
            out.append(rel.as_posix())
    return sorted(out)


def write_record(folder: Path, names: list[str] | None = None) -> dict[str, str]:
    """Record the sha256 of `names` (default: every file in `folder`) as its completion record; returns them."""
    files = {name: sha256_file(folder / name) for name in (folder_files(folder) if names is None else sorted(names))}
    write_json(folder / RECORD, {"files": files})
    return files


def read_record(folder: Path) -> dict[str, str]:
    """The files a folder's completion record lists with their sha256: IncompleteError without a folder or a
    record, ArtifactError for a record that is unreadable or names a path outside the folder."""
    path = folder / RECORD
    if not folder.is_dir():
        raise IncompleteError(f"{folder}: not written")
    if not path.is_file():
        raise IncompleteError(f"{path}: missing: the step that writes {folder.name}/ did not finish (or an older "
                              "recsae wrote it)")  # fmt: skip
    record = read_json(path)
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) and len(v) == 64 for v in files.values()):
        raise ArtifactError(f"{path}: not a completion record (corrupt)")
    for name in files:
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts:
            raise ArtifactError(f"{path}: names {name!r}, outside its folder (corrupt)")
    return files


def check_digests(folder: Path, files: dict[str, str], listing: str) -> None:
    """Raise ArtifactError naming the first of `files` (relative path -> sha256) that is missing from `folder` or
    whose bytes differ; `listing` names what lists them (a completion record, a bundle's manifest)."""
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {listing} but missing")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path}: sha256 does not match {listing} (corrupt or modified)")


def check_record(folder: Path, required: tuple[str, ...] = (), exhaustive: bool = True) -> dict[str, str]:
    """Check a folder against its completion record and return what it lists. Raises ArtifactError naming the first
    file that is missing, differs from its recorded sha256 or (with `exhaustive`) is not recorded at all, and
    IncompleteError when the record is absent or lacks one of `required`."""
    files = read_record(folder)
    check_digests(folder, files, str(folder / RECORD))
    if missing := [name for name in required if name not in files]:
        raise IncompleteError(f"{folder / RECORD}: does not list {missing[0]}")
    if exhaustive and (extra := [name for name in folder_files(folder) if name not in files]):
        raise ArtifactError(f"{folder / extra[0]}: not covered by {folder / RECORD} (added after its step finished)")
    return files


def forget_recorded(folder: Path, names: list[str]) -> None:
    """Drop `names` from a folder's record before they are rewritten, so a write cut short reads as unfinished."""
    try:
        files = read_record(folder)
    except IncompleteError:
        return
    except ArtifactError:
        files = {}  # an unreadable record vouches for nothing; it is rewritten below
    write_json(folder / RECORD, {"files": {k: v for k, v in files.items() if k not in names}})


def add_recorded(folder: Path, names: list[str]) -> None:
    """Record `names` (just written, all in `folder`) beside what the record already lists."""
    try:
        files = read_record(folder)
    except ArtifactError:
        files = {}
    files.update({name: sha256_file(folder / name) for name in names})
    write_json(folder / RECORD, {"files": dict(sorted(files.items()))})


def write_json_recorded(path: Path, obj: Any) -> None:
    """`write_json`, with the file forgotten by its folder's record while it is rewritten and recorded after."""
    forget_recorded(path.parent, [path.name])
    write_json(path, obj)
    add_recorded(path.parent, [path.name])
