"""Where the offline jobs run: in this process (the default), or on a Ray cluster (`RayConfig.address`). Imports no
Ray until a cluster is asked for, so the one-process path and the command line stay light."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import NonNegativeInt, check_fields

ADDRESS_ENV = "RAY_ADDRESS"


@dataclass
class RayConfig:
    """The Ray cluster an offline step runs on."""

    address: str | None = None
    """The Ray cluster to run on: its address (host:port, ray://host:port) or 'auto' (the cluster this process runs in;
    default $RAY_ADDRESS, else one process without Ray)"""
    workers: NonNegativeInt = 0
    """Workers of a step that runs on Ray (0: one per CPU of the cluster)"""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.address is None:
            self.address = os.environ.get(ADDRESS_ENV) or None
        if self.address is not None and not self.address.strip():
            raise ConfigError("RayConfig.address: empty; give host:port, ray://host:port or auto")

    @property
    def on_ray(self) -> bool:
        """Whether a cluster was asked for."""
        return self.address is not None


def connect(address: str) -> dict[str, float]:
    """Join the Ray cluster at `address` ('auto': the one this process runs in) unless already joined; its
    resources. One line naming the address when there is no cluster there."""
    import ray

    if ray.is_initialized() and not same_cluster(address, ray.get_runtime_context().gcs_address):
        ray.shutdown()  # joined to another cluster (a local one this process started): leave it for the one asked
    if not ray.is_initialized():
        reachable(address)
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ConfigError(f"--ray-address {address}: no Ray cluster to join ({first})") from None
    return ray.cluster_resources()


def same_cluster(address: str, gcs_address: str) -> bool:
    """Whether `address` names the cluster whose GCS is at `gcs_address` ('auto' names whichever is joined). Only
    the ports are compared: Ray reports its node's address where the user may have written 127.0.0.1 or a name."""
    if address == "auto":
        return True
    return address.removeprefix("ray://").rpartition(":")[2] == gcs_address.rpartition(":")[2]


def reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse at once an address where nothing listens: Ray would keep retrying it for minutes. ('auto' is
    resolved by Ray from this machine's session, and fails fast by itself.)"""
    if address == "auto":
        return
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--ray-address {address}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"--ray-address {address}: no Ray cluster to join ({err.strerror or err})") from None


def cluster_workers(config: RayConfig, resource: str = "CPU") -> int:
    """Join the cluster of `config` and return the workers a step starts there: as configured, else one per
    `resource` of the cluster (CPU; GPU for training on GPUs). More than the cluster has are refused in one line: a
    worker that finds no `resource` never starts, and the work dealt to it would wait forever."""
    if config.address is None:
        raise ConfigError("a step on Ray needs a Ray address (RayConfig.address)")
    have = int(connect(config.address).get(resource, 0))
    workers = config.workers or max(1, have)
    if workers > have:
        raise ConfigError(f"--ray-workers {workers}: the cluster has {have} {resource}s")
    return workers
