"""The options of one soak run (`recsae bench soak`), as a config dataclass from which the command line is derived.

Kept apart from service/soak.py so that building the CLI's parser imports nothing heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from recsae_core.common.cli_config import ConfigOptions
from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_fields,
)

MAX_BAD_SHARE = 0.5
"""Above this the soak would mostly measure refusals."""


@dataclass
class SoakOptions:
    """One soak run."""

    bundle: Path
    """Bundle folder to serve."""
    minutes: PositiveFloat = 30.0
    """Length of the run in minutes, whole windows only (the issue's goals are for 30)."""
    concurrency: PositiveInt = 8
    """Closed-loop clients."""
    replicas: PositiveInt = 1
    """Serve replicas."""
    bad_share: Fraction = 0.05
    """Share of bad requests in the traffic."""
    seed: NonNegativeInt = 0
    """Seed of the traffic schedule."""
    window: PositiveFloat = 30.0
    """Seconds per sampling window."""
    warmup: NonNegativeFloat = 60.0
    """Seconds at the start whose windows are warm-up, not the baseline of growth and drift."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.bad_share > MAX_BAD_SHARE:
            raise ConfigError(f"SoakOptions.bad_share {self.bad_share} is over {MAX_BAD_SHARE}")
        if self.concurrency > 1024:
            raise ConfigError(f"SoakOptions.concurrency {self.concurrency}: at most 1024 clients")
        if self.replicas > 64:
            raise ConfigError(f"SoakOptions.replicas {self.replicas}: at most 64 replicas")
        if self.n_windows - self.first_steady < 2:
            raise ConfigError(
                f"SoakOptions.minutes {self.minutes:g} gives {self.n_windows} window(s) of SoakOptions.window "
                f"{self.window:g} s, and the SoakOptions.warmup of {self.warmup:g} s takes the first "
                f"{self.first_steady}; a soak needs 2 steady windows after the warm-up (SoakOptions.minutes >= "
                f"{(self.first_steady + 2) * self.window / 60:g})"
            )

    @property
    def n_windows(self) -> int:
        """Whole windows in the run."""
        return int(self.minutes * 60 // self.window)

    @property
    def first_steady(self) -> int:
        """Index of the first window that starts at or after the warm-up."""
        return math.ceil(self.warmup / self.window - 1e-9)


SOAK_OPTIONS = ConfigOptions(SoakOptions, {
    "minutes": "--minutes", "concurrency": "--concurrency", "replicas": "--replicas", "bad_share": "--bad-share",
    "seed": "--seed", "window": "--window", "warmup": "--warmup",
})  # fmt: skip
"""`recsae bench soak`'s options (besides --bundle and --out)."""
