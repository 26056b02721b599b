"""What each process costs while the service answers: CPU time of every process on the machine by its role (proxy,
each deployment's replicas, Ray's system processes, the load generator, everything else), and py-spy's samples of a
process grouped by the code they were in. Used by `recsae bench profile` (service.bench_profile)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from recsae_core.common.errors import ConfigError

ROLES = (
    ("proxy", "ray::ProxyActor"),
    ("controller", "ray::ServeController"),
    ("raylet", "/raylet"),
    ("gcs", "gcs_server"),
    ("dashboard agent (metrics export)", "ray::DashboardAgent"),
    ("dashboard", "dashboard/dashboard.py"),
    ("runtime-env agent", "ray::RuntimeEnvAgent"),
    ("log monitor", "log_monitor.py"),
    ("autoscaler monitor", "autoscaler/_private/monitor.py"),
    ("other Ray workers", "ray::"),
    ("other Ray workers", "default_worker.py"),
)
"""Process roles by a piece of their command line, first match wins."""


def _role(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return "load generator + Ray driver (this process)"
    if cmdline.startswith("ray::ServeReplica:"):  # ray::ServeReplica:APP:DEPLOYMENT
        return f"replica {cmdline.split()[0].split(':')[-1]}"
    return next((role for role, part in ROLES if part in cmdline), "everything else on the machine")


def cpu_snapshot() -> tuple[dict[int, tuple[str, float]], float]:
    """CPU seconds so far of every process (with its role), and of the whole machine (from /proc/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[int(entry)] = (_role(int(entry), cmdline), (int(fields[11]) + int(fields[12])) / tick)
    busy = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    machine = (sum(busy) - busy[3] - busy[4]) / tick  # all but idle and iowait
    return procs, machine


OTHERS = "everything else on the machine"


def cpu_seconds(before: tuple, after: tuple) -> dict[str, float]:
    """CPU seconds each role spent between two snapshots; OTHERS is the machine's total less the roles named (other
    tenants, and processes that ended in the window)."""
    (p0, m0), (p1, m1) = before, after
    by_role: Counter[str] = Counter()
    for pid, (role, cpu) in p1.items():
        if role != OTHERS:
            by_role[role] += cpu - (p0[pid][1] if pid in p0 else 0.0)
    by_role[OTHERS] = (m1 - m0) - sum(by_role.values())
    return dict(by_role)


def cpu_use(spent: dict[str, float], seconds: float, requests: int, idle: dict[str, float]) -> dict[str, Any]:
    """Cores each role kept busy, and its CPU milliseconds per request above its own idle use (`idle`, cores)."""
    n = max(requests, 1)
    # OTHERS per request would be noise: other tenants come and go independently of these requests.
    extra = {role: (cpu - idle.get(role, 0.0) * seconds) * 1000 / n for role, cpu in spent.items() if role != OTHERS}
    return {
        "cores": {role: round(cpu / seconds, 3) for role, cpu in sorted(spent.items(), key=lambda kv: -kv[1])},
        "ms_per_request": {role: round(ms, 3) for role, ms in sorted(extra.items(), key=lambda kv: -kv[1])},
    }


# ------------------------------------------------------------------ py-spy


def _owner(frame: str) -> str:
    """The code a py-spy frame ('function (path:line)', the path relative to site-packages) belongs to."""
    path = "/" + frame[frame.rfind("(") + 1 :]
    for marker, name in (
        ("/service/", "recsae service"),
        ("/recsae_core/", "recsae core"),
        ("/ray/serve/", "ray serve"),
        ("/ray/", "ray core"),
        ("/uvicorn/", "uvicorn"),
        ("/starlette/", "starlette/fastapi"),
        ("/fastapi/", "starlette/fastapi"),
        ("/pydantic", "pydantic"),
        ("/asyncio/", "asyncio"),
        ("/opentelemetry/", "metrics/tracing"),
        ("/prometheus_client/", "metrics/tracing"),
        ("/grpc/", "grpc"),
        ("/numpy/", "numpy"),
        ("/onnxruntime/", "onnxruntime"),
    ):
        if marker in path:
            return name
    return f"other: {path.split('/')[1].split(':')[0]}"


WAITING = ("(threading.py:", "(queue.py:", "(selectors.py:", "(concurrent/futures/thread.py:")
"""Innermost frames of a thread that waits (an idle worker thread, an event loop in select): not work."""


def py_spy_summary(raw: Path) -> dict[str, Any]:
    """Samples by the innermost recsae frame if any (engine work under numpy counts as recsae), else by the owner of
    the innermost frame. Samples of threads that wait are counted apart (`waiting`): py-spy cannot always tell them
    idle without stopping the process, which the profile does not do."""
    counts: Counter[str] = Counter()
    waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        if any(marker in frames[-1] for marker in WAITING):
            waiting += int(n)
            continue
        owners = [_owner(f) for f in frames]
        mine = [i for i, o in enumerate(owners) if o.startswith("recsae")]
        if mine:
            frame = frames[mine[-1]]
            key = f"recsae: {frame[: frame.find(' (')]}"
        else:
            key = owners[-1]
        counts[key] += int(n)
    total = sum(counts.values())
    top = {k: round(100 * v / total, 1) for k, v in counts.most_common(15)} if total else {}
    return {"samples": total, "waiting": waiting, "percent": top}


def run_py_spy(pids: dict[str, int], seconds: float, folder: Path, rate: int = 200) -> list[subprocess.Popen]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise ConfigError("--py-spy needs py-spy (pip install py-spy; scripts/setup.sh installs it)")
    spies = []
    for role, pid in pids.items():
        command = [spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
                   "--nonblocking", "--format", "raw", "--output", str(folder / f"{role}.txt")]  # fmt: skip
        spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def spied_pids() -> dict[str, int]:
    """The proxy's and one replica of each deployment's pid."""
    procs, _ = cpu_snapshot()
    out = {}
    for pid, (role, _cpu) in procs.items():
        if (role == "proxy" or role.startswith("replica ")) and role not in out:
            out[role] = pid
    return out
