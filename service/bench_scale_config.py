"""The options of `recsae bench scale`, as a config dataclass from which the command line is derived.

Kept apart from service/bench_scale.py so that building the CLI's parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from recsae_core.common.cli_config import ConfigOptions
from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_fields

PARTS = ("probe", "sae", "catalog", "serve")
"""What the benchmark measures, in the order it runs them."""
MIN_ITEMS = 20
"""Smallest catalogue: a ranking of 10 items out of fewer says little."""
MAX_CONCURRENCY = 1024
DEFAULT_WORK_DIR = Path("runs/bench-scale")


@dataclass
class ScaleOptions:
    """One run of the scale benchmark."""

    out: Path
    """JSON report."""
    items: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    """Catalogue sizes served; the smallest is the catalogue the model is imported with."""
    concurrency: tuple[int, ...] = (1, 16)
    """Closed-loop clients of each serving measurement."""
    parts: tuple[str, ...] = PARTS
    """What to measure."""
    users: PositiveInt = 1_000_000
    """Users of the synthetic two-tower model (one probed h each)."""
    eval_users: NonNegativeInt = 2_000
    """Users given a valid and a test interaction (at most --users): the import's evaluation and the SAE's selection
    run on them."""
    seed: NonNegativeInt = 0
    """Seed of the synthetic model, its log and every SAE."""
    sae_samples: PositiveInt = 2_000_000
    """Training-sample budget of every SAE run (one process, 1 and 2 DDP workers, and the served SAE)."""
    latents: PositiveInt = 1024
    """SAE width."""
    k: PositiveInt = 8
    """SAE latents kept per sample."""
    probe_batch: PositiveInt = 2048
    """Rows per probe batch (one Ray Data block each)."""
    duration: PositiveFloat = 5.0
    """Measured seconds per round, mode and concurrency."""
    warmup: NonNegativeFloat = 1.0
    """Unmeasured seconds before each measured run."""
    rounds: PositiveInt = 3
    """Interleaved rounds of bare, monitor and steer per catalogue size and concurrency."""
    work_dir: Path = DEFAULT_WORK_DIR
    """Where the generated model, its run and the bundles go (reused by a rerun with the same model options)."""
    ray_address: str | None = None
    """The Ray cluster of the distributed parts (default: a local one with 2 CPUs, started and stopped here)."""
    progress: bool = True
    """Progress bars on stderr."""

    def __post_init__(self) -> None:
        check_fields(self)
        if min(self.items) < MIN_ITEMS:
            raise ConfigError(f"--items: every catalogue needs at least {MIN_ITEMS} items, got {min(self.items)}")
        if len(set(self.items)) != len(self.items):
            raise ConfigError(f"--items: sizes repeat ({','.join(map(str, self.items))})")
        if max(self.concurrency) > MAX_CONCURRENCY:
            raise ConfigError(f"--concurrency: at most {MAX_CONCURRENCY} clients, got {max(self.concurrency)}")
        if unknown := [p for p in self.parts if p not in PARTS]:
            raise ConfigError(f"--parts: unknown part(s) {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
        if self.k > self.latents:
            raise ConfigError(f"--k {self.k} exceeds --latents {self.latents}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError("--ray-address: empty; give host:port, ray://host:port or auto")
        if self.out.is_dir():
            raise ConfigError(f"--out {self.out}: is a folder; give the JSON file to write")

    @property
    def import_items(self) -> int:
        """The catalogue the model is imported with (its log names these items only)."""
        return min(self.items)


SCALE_OPTIONS = ConfigOptions(ScaleOptions, {
    "users": "--users", "eval_users": "--eval-users", "seed": "--seed", "sae_samples": "--sae-samples",
    "latents": "--latents", "k": "--k", "probe_batch": "--probe-batch", "duration": "--duration",
    "warmup": "--warmup", "rounds": "--rounds", "ray_address": "--ray-address", "progress": "--quiet",
})  # fmt: skip
"""`recsae bench scale`'s scalar options (the lists, --out and --work-dir are added by `add_scale_options`)."""


def int_tuple(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated positive integers, refused in one line naming `flag`."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} expects comma-separated positive integers, got {text!r}")
    return values


def add_scale_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="JSON report")
    parser.add_argument("--items", default="10000,100000,1000000",
                        help="catalogue sizes served, comma-separated; the smallest is the imported one")  # fmt: skip
    parser.add_argument("--concurrency", default="1,16", help="closed-loop clients per serving run, e.g. 1,16")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, some of {','.join(PARTS)}")
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR,
        help=f"where the generated model, its run and the bundles go (default: {DEFAULT_WORK_DIR})",
    )  # fmt: skip
    SCALE_OPTIONS.add_to(parser)


def scale_options(args: argparse.Namespace) -> ScaleOptions:
    """The options from the parsed command line; every problem is one ConfigError naming the option."""
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if not parts:
        raise ConfigError(f"--parts: expected some of {', '.join(PARTS)}, got {args.parts!r}")
    return SCALE_OPTIONS.build(
        args, out=args.out, items=tuple(sorted(int_tuple(args.items, "--items"))),
        concurrency=int_tuple(args.concurrency, "--concurrency"), parts=parts, work_dir=args.work_dir,
    )  # fmt: skip
