"""The Ray cluster a benchmark of offline steps runs on: the one the user names, or a local one the benchmark starts
with `ray start --head --block` and stops at its end.

Only that cluster is stopped: `ray stop` would stop every Ray on the machine (another user's, a test's), so the
blocking `ray start` process is started in a session of its own, which its cluster's processes and workers share;
at the end it is sent SIGTERM, and what is left of that session a few seconds later is killed. `ray start` also
records its cluster as the machine's current one (the one a plain `ray.init()` joins); that record is put back as it
was as soon as the cluster listens, so that no other process joins it by accident.

The cluster and this process's driver run with RAY_AUTH_MODE=disabled: a process keeps the auth mode it first joins
a cluster with, and a driver must share its cluster's. A local service started afterwards in the same process
(service.local.start_local) then runs in that mode too.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from recsae_core.common.errors import RecsaeError
from service.local import free_port

RAY = str(Path(sys.executable).with_name("ray"))
AUTH = {"RAY_AUTH_MODE": "disabled"}
START_TIMEOUT_S = 180.0
STOP_GRACE_S = 5.0
START_TRIES = 3
"""Starts tried, each on a new port: a port free a moment ago can be one Ray gives another of its own components (its
dashboard agent listens on 52365 by default), and `ray start` then exits at once ("make sure the same port is not used
by multiple components")."""
RECORD_WAIT_S = 10.0
"""How long `ray start` is given, once its cluster listens, to record it as the machine's current one."""
PR_SET_PDEATHSIG = 1


@contextmanager
def local_cluster(cpus: int) -> Iterator[str]:
    """A local Ray cluster with `cpus` CPUs for the duration of the block; yields its address (127.0.0.1:port)."""
    os.environ.update(AUTH)  # this process's driver joins with the cluster's auth mode
    current = _current_cluster_file()
    before = current.read_text() if current.is_file() else None
    with tempfile.TemporaryFile(mode="w+") as log:
        process, port = _start(cpus, log, current, before)
        try:
            _restore_current(current, before, port, wait_s=RECORD_WAIT_S)  # nobody else's plain ray.init() joins it
            yield f"127.0.0.1:{port}"
        finally:
            _leave()
            _stop(process)
            _restore_current(current, before, port)


def _start(cpus: int, log: IO[str], current: Path, before: str | None) -> tuple[subprocess.Popen, int]:
    """`ray start --head --block` on a free port, listening; a start that exits at once is tried again on another
    port (`START_TRIES`), one that does not listen in time is not."""
    for attempt in range(1, START_TRIES + 1):
        port = free_port()
        log.seek(0)
        log.truncate()
        process = subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
             "--disable-usage-stats", "--block"],
            env={**os.environ, **AUTH}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        try:
            _wait_listening(process, port, log)
            return process, port
        except RecsaeError:
            exited = process.poll() is not None
            _stop(process)
            _restore_current(current, before, port)
            if not exited or attempt == START_TRIES:
                raise
    raise AssertionError("unreachable")


def _die_with_parent() -> None:
    """In the child before `ray start` runs: SIGTERM to it when this process dies without stopping it (a fatal error in
    Ray's core worker ends a driver without running any `finally`), on which it stops its cluster. Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _current_cluster_file() -> Path:
    """Where `ray start` records the machine's current cluster, the one a plain `ray.init()` joins."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def _restore_current(path: Path, before: str | None, port: int, wait_s: float = 0.0) -> None:
    """Undo `ray start`'s record of this cluster as the machine's current one (as `ray stop` would, which removes
    it): a plain `ray.init()` elsewhere would otherwise join this cluster while it runs (and refuse its own
    num_cpus), try to join it once it is gone, or no longer find the one it joined before. Left alone when another
    cluster has been recorded since. `wait_s`: how long to wait for `ray start` to write the record."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not _names_port(path, port):
        time.sleep(0.1)
    with suppress(OSError):
        if path.read_text().strip().rpartition(":")[2] != str(port):
            return
        if before is None:
            path.unlink()
        else:
            path.write_text(before)


def _names_port(path: Path, port: int) -> bool:
    try:
        return path.read_text().strip().rpartition(":")[2] == str(port)
    except OSError:
        return False


def _wait_listening(process: subprocess.Popen, port: int, log: IO[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            last = (log.read().strip().splitlines() or ["no output"])[-1][:300]
            raise RecsaeError(f"the local Ray cluster did not start (ray start exited {process.returncode}: {last})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RecsaeError(f"the local Ray cluster did not listen on port {port} within {START_TIMEOUT_S:.0f}s")


def _leave() -> None:
    """This process's driver leaves the cluster before it stops (a driver left joined would wait on a dead GCS)."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start`, then SIGKILL to whatever of its session is left: its raylet waits about 30 s on Ray
    Data's own actors before it exits by itself, and nothing there is worth waiting for once the benchmark is done."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(STOP_GRACE_S)
    if Path("/proc").is_dir():
        for pid in _session(process.pid):
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    else:  # no /proc to find the session by: its process group, which all but Ray's workers share
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _session(sid: int) -> list[int]:
    """The processes of session `sid` (the `ray start` process's own: its cluster's processes and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(ProcessLookupError, PermissionError):
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
    return found


def warm_up(address: str) -> None:
    """Join the cluster and run one trivial Ray Data job, so that what a cluster starts once (Ray Data's own actors,
    the first worker processes) is not charged to whichever measurement comes first."""
    import ray.data

    from recsae_core.common.ray_cluster import connect

    connect(address)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per dataset otherwise
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.range(4, override_num_blocks=2).map_batches(lambda batch: batch).materialize()


@contextmanager
def cluster(address: str | None, cpus: int) -> Iterator[tuple[str, bool]]:
    """(address, started here): the cluster at `address` as it is, or a local one started for the block. Either
    way this process's driver has left it at the end, so that a local service can start a Ray of its own."""
    if address is not None:
        try:
            yield address, False
        finally:
            _leave()
        return
    with local_cluster(cpus) as started:
        yield started, True
