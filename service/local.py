"""Running the service on this machine: a local Ray with a fixed metrics port, the app on loopback.

Deployment goes through a Serve config (the same `ServeDeploySchema` a YAML file, `serve deploy` or KubeRay's
serveConfigV2 produce), because that is the path on which a changed `user_config` is applied to running replicas
by `reconfigure()`: `serve.run()` from Python always replaces replicas. The controller client used to apply it is
the one Ray's own `serve run config.yaml` uses (`ray.serve._private.api.serve_start`).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from recsae_core.common.errors import ConfigError, RecsaeError

APP_NAME = "recsae"
MODEL_DEPLOYMENT = "recsae"
"""The deployment that holds the bundle (service.app:RecsaeService; HTTP enters through its ingress)."""
BUILDER = "service.app:app_builder"


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})
"""Ports Ray's own components take unless told otherwise (GCS, dashboard, client server, dashboard agent): a port
handed out here for something else must not be one that a Ray started afterwards binds."""
RAY_WORKER_PORTS = range(10002, 20000)
"""Ray's default `--min-worker-port`..`--max-worker-port`: each worker a Ray starts binds one of these."""
FALLBACK_EPHEMERAL = (32768, 60999)
_handed_out: set[int] = set()


def ephemeral_ports() -> range:
    """The ports the kernel hands to sockets bound to port 0 (Linux's ip_local_port_range)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = FALLBACK_EPHEMERAL
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, that no other call here handed out, outside Ray's own ports and outside the
    kernel's ephemeral range. Between this check and the bind of whoever asked, every process that binds port 0 (each
    of Ray's gRPC servers, a dozen per start) draws from the ephemeral range: a port from there could be taken in the
    meantime (seen in CI: "Failed to bind to address 127.0.0.1:41931"). Where no other range is left (an unusual
    ip_local_port_range), the kernel's port 0 is the fallback."""
    ephemeral = ephemeral_ports()
    candidates = [p for p in range(RAY_WORKER_PORTS.stop, ephemeral.start) if p not in RAY_DEFAULT_PORTS]
    draw = random.SystemRandom()
    for _ in range(200 if candidates else 0):
        port = draw.choice(candidates)
        if port not in _handed_out and port_free(host, port) and port_free("0.0.0.0", port):
            _handed_out.add(port)
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in RAY_DEFAULT_PORTS and port not in _handed_out:
            _handed_out.add(port)
            return port


QUIET = {"log_level": "WARNING", "enable_access_log": False}


def app_config(
    args: dict[str, Any], user_config: dict[str, Any], name: str = APP_NAME, route_prefix: str = "/", **extra: Any
) -> dict[str, Any]:
    """One application of a Serve config: builder args (fixed), service settings in the deployment's user_config."""
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": BUILDER,
        "args": args,
        "deployments": [{"name": MODEL_DEPLOYMENT, "user_config": user_config}],
        "logging_config": QUIET,
        **extra,
    }


def deploy(config: dict[str, Any], timeout_s: float = 300.0) -> None:
    """Apply a Serve config and wait until its applications run (or raise naming the failure)."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    client = serve_api.serve_start()
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    names = {app["name"] for app in config["applications"]}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        statuses = {n: apps[n].status for n in names if n in apps}
        failed = {n: apps[n].message for n, s in statuses.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RecsaeError(f"deployment failed: {failed}")
        if len(statuses) == len(names) and set(statuses.values()) == {"RUNNING"}:
            return
        time.sleep(0.25)
    raise RecsaeError(f"applications {sorted(names)} not running after {timeout_s:.0f}s")


@dataclass
class LocalService:
    """A started local service; `update()` reconfigures it in place, `stop()` shuts Serve and Ray down."""

    url: str
    metrics_url: str
    args: dict[str, Any]
    user_config: dict[str, Any] = field(default_factory=dict)
    extra_apps: list[dict[str, Any]] = field(default_factory=list)
    """Other applications deployed beside this one (a Serve config lists every application it keeps)."""

    def config(self) -> dict[str, Any]:
        return {"applications": [app_config(self.args, self.user_config), *self.extra_apps]}

    def update(self, timeout_s: float = 60.0, **changes: Any) -> dict[str, Any]:
        """Change user_config fields as `serve deploy` of an edited config would, wait until the controller reports
        every replica on the new config, then until a replica reports it (or reports refusing it). Returns that
        replica's /readyz."""
        from ray import serve

        from service.rollout import wait

        self.user_config = {**self.user_config, **changes}
        started = time.time()
        before = serve.status().applications[APP_NAME].last_deployed_time_s
        deploy(self.config())
        wait(APP_NAME, MODEL_DEPLOYMENT, before, timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                ready = {}
            applied = all(ready.get("config", {}).get(k) == v for k, v in self.user_config.items())
            refused = ready.get("last_reload", {}).get("outcome") == "refused"
            if applied or (refused and ready["last_reload"].get("at", 0) >= started):
                return ready
            time.sleep(0.1)
        raise RecsaeError(f"the service did not apply {changes} within {timeout_s:.0f}s")

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# Ray's proxy must answer its readiness probe within 5 s by default; on a loaded 2-core machine it can take longer,
# and Ray then kills it and the app never starts. Explicit settings in the environment still win.
PATIENT_RAY_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def slow_machine_env() -> None:
    for key, value in PATIENT_RAY_ENV.items():
        os.environ.setdefault(key, value)


HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
"""Ray Serve's high-throughput mode (Ray >= 2.56, "Enable High Throughput on Ray Serve"): HAProxy is the HTTP ingress
and hands each request straight to an ingress replica's own HTTP server, so no Python proxy actor and no actor call
sit on the way in; calls between deployments go over gRPC; user code runs on the replica's main event loop. On the
2-core machine it cut the p50 at concurrency 1 about 3-fold and raised throughput at 16 about 4-fold
(docs/benchmarks.md). Not the default: under it a burst beyond the replicas' capacity waits in HAProxy instead of
being shed with 503 by Ray's proxy (docs/deploy.md, Overload). Set both in the environment to use it."""
HAPROXY_LOCAL_ENV = {"RAY_SERVE_HAPROXY_NBTHREAD": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
"""With HAProxy on, locally: one HAProxy thread (one machine), and replicas drain 1 s instead of 30 on shutdown (the
30 s give a cluster's load balancers time to stop sending; here HAProxy is told at once)."""
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
_chosen: set[str] = set()


def haproxy_local_env() -> None:
    """With HAProxy on (HIGH_THROUGHPUT_ENV in the environment): HAPROXY_LOCAL_ENV where the environment does not say
    otherwise, and free ports for HAProxy's stats and metrics listeners. Ray's defaults (8404, 9101) are per machine,
    so a second local service at once (a test, a bench, another user) would fail to start. Ports set by the user win;
    the ones chosen here are chosen anew at each start."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return
    for key, value in HAPROXY_LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    for key in HAPROXY_PORTS:
        if key in _chosen or key not in os.environ:
            os.environ[key] = str(free_port())
            _chosen.add(key)


def start_local(
    bundle: Path,
    port: int = 8000,
    metrics_port: int = 8081,
    host: str = "127.0.0.1",
    replicas: int = 1,
    user_config: dict[str, Any] | None = None,
    num_cpus: float | None = None,
    extra_apps: list[dict[str, Any]] | None = None,
    app_args: dict[str, Any] | None = None,
) -> LocalService:
    """Start Ray (metrics exported on `metrics_port`) and the app on host:port; ports are checked first.
    `app_args` adds builder arguments (service.app:app_builder), e.g. max_queued_requests."""
    for name, (h, p) in {"--port": (host, port), "--metrics-port": ("127.0.0.1", metrics_port)}.items():
        if not port_free(h, p):
            raise ConfigError(f"{name} {p}: {h}:{p} is already in use")
    import ray
    from ray import serve

    slow_machine_env()
    haproxy_local_env()
    cpus = os.cpu_count() or 1
    per_replica = num_cpus if num_cpus is not None else min(1.0, cpus / replicas)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # address="local": a new Ray for this service even where `ray start` runs a cluster on this machine (plain
    # ray.init() would join that one, and refuse num_cpus).
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _metrics_export_port=metrics_port,
             logging_level=logging.WARNING)  # fmt: skip
    args = {"bundle": str(bundle), "num_replicas": replicas, "num_cpus": per_replica, **(app_args or {})}
    config = {"bundle": str(bundle), "threads": max(1, int(per_replica)), **(user_config or {})}
    service = LocalService(
        f"http://{host}:{port}", f"http://127.0.0.1:{metrics_port}/metrics", args, config, list(extra_apps or [])
    )
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
        deploy(service.config())
    except BaseException as err:
        serve.shutdown()
        ray.shutdown()
        if isinstance(err, Exception) and not isinstance(err, RecsaeError):
            first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
            raise RecsaeError(f"the service failed to start: {first}") from err
        raise
    return service
