"""The options of `recsae bench reliability` (service/reliability.py), as a config dataclass from which the command
line is derived. Kept apart so that building the CLI's parser imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recsae_core.common.cli_config import ConfigOptions
from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import NonNegativeFloat, PositiveFloat, PositiveInt, check_fields

SCENARIOS = ("rollout", "kill", "overload", "relay")


@dataclass
class ReliabilityOptions:
    """One reliability scenario."""

    bundle: Path
    """Bundle folder to serve."""
    scenario: str
    """One of SCENARIOS."""
    to: Path | None = None
    """The bundle the rollout scenario rolls out (default: a copy of `bundle` with another version)."""
    replicas: PositiveInt = 2
    """Model replicas."""
    concurrency: PositiveInt = 8
    """Closed-loop clients during a rollout or a kill."""
    settle: PositiveFloat = 5.0
    """Seconds of load before and after each event."""
    duration: PositiveFloat = 10.0
    """Seconds of each overload measurement (unloaded, saturated, overloaded, after) and relay run."""
    rounds: PositiveInt = 4
    """Relay: interleaved rounds of each path at each concurrency."""
    saturation_concurrency: PositiveInt = 32
    """Closed-loop clients that measure the saturation throughput."""
    factor: PositiveFloat = 5.0
    """Overload: the open loop's rate as a multiple of the saturation throughput."""
    max_ongoing_requests: PositiveInt = 16
    """Requests a model replica takes at once (the service's default is 64: 2 x max_batch_size)."""
    max_queued_requests: int = 16
    """Requests that may wait beyond those, per ingress replica; more are shed (-1: unbounded)."""
    retry_after_s: NonNegativeFloat = 1.0
    """Retry-After of a shed request's 503, in seconds."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.scenario not in SCENARIOS:
            raise ConfigError(f"ReliabilityOptions.scenario {self.scenario!r}: one of {', '.join(SCENARIOS)}")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ConfigError(f"ReliabilityOptions.max_queued_requests {self.max_queued_requests}: -1 or >= 1")
        if self.replicas < 2 and self.scenario == "kill":
            raise ConfigError("ReliabilityOptions.replicas: the kill scenario needs at least 2 replicas")


RELIABILITY_OPTIONS = ConfigOptions(ReliabilityOptions, {
    "replicas": "--replicas", "concurrency": "--concurrency", "settle": "--settle", "duration": "--duration",
    "rounds": "--rounds", "saturation_concurrency": "--saturation-concurrency", "factor": "--factor",
    "max_ongoing_requests": "--max-ongoing-requests", "max_queued_requests": "--max-queued-requests",
    "retry_after_s": "--retry-after",
})  # fmt: skip
"""`recsae bench reliability`'s options (besides --bundle, --scenario, --to and --out)."""
