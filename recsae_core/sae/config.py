"""The configuration of one SAE training run, and the values it resolves against the data.

`SAETrainConfig` holds everything a run is asked to do: the dictionary's shape, the optimiser, early stopping and
checkpoint selection. The saved architecture (`model.SAEConfig`, the SAELens-style cfg.json) is built from it plus
the activations' width, as EleutherAI sparsify builds its SaeConfig from a TrainConfig. Defaults are the pipeline's:
they are what users run. The command line derives its SAE options from the fields (pipeline.options).

Imports no torch, so the command line can build its parser without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_fields,
)

if TYPE_CHECKING:
    from recsae_core.sae.model import SAEConfig

SELECT_SAMPLES = 50_000
"""Training samples between two checkpoint evaluations when select_every is 0 (at most one evaluation per epoch)."""


@dataclass
class SAETrainConfig:
    """One SAE training run (RecSAE's shape: 16 x d latents, k=8)."""

    n_latents: PositiveInt = 1024
    """SAE width (RecSAE: 16 x d)."""
    k: PositiveInt = 8
    """Latents kept per sample."""
    # Above RecSAE's grid (1e-5..1e-4): with under 1M samples lower rates stop with many latents dead
    # (docs/benchmarks.md).
    lr: PositiveFloat = 3e-3
    """Learning rate of Adam."""
    epochs: PositiveInt = 1000
    """Upper bound; early stopping ends sooner."""
    # The budget is counted in samples, not seconds, so that a seed and a budget give the same SAE on a busy and on
    # a quiet machine. 20M is what ML-1M SASRec's SAE needs for FVU 0.03 with 2.4% dead (24 epochs of 822k samples,
    # docs/benchmarks.md); the one-sample-per-user models reach their epoch cap (1000 x 6k on ML-1M) first.
    max_samples: NonNegativeInt = 20_000_000
    """Training-sample budget: training ends after the epoch that reaches it, that epoch scored (0 = none)."""
    patience: PositiveInt = 10
    """Checkpoint evaluations without a kept checkpoint before the learning rate drops or training stops."""
    # Not a budget: when it fires the best checkpoint so far is kept, and that SAE depends on the machine's speed.
    max_minutes: NonNegativeFloat = 60.0
    """Wall-clock safety stop: when it fires, a warning and stopped_by wall_clock_safety in metrics.json (0 = none)."""
    # RecSAE's one-epoch window is ~800k samples on ML-1M SASRec, so revived latents starve for an epoch before AuxK
    # helps them again: 15% dead after 5 epochs there, against 3.8% with 80k (docs/benchmarks.md).
    dead_after: PositiveInt = 80_000
    """Training samples without firing after which AuxK treats a latent as dead (capped at one epoch)."""
    max_dead: Fraction = 0.05
    """Checkpoints with a larger share of dead latents lose to any with a smaller one, whatever their score."""
    # Selection scores on a few thousand users are noisy at the third decimal: without a tolerance an early lucky
    # epoch wins over a later, more faithful SAE.
    select_tolerance: Fraction = 0.005
    """Relative slack on the selection score within which checkpoints tie (the better reconstruction wins)."""
    min_fvu_gain: Fraction = 0.005
    """Relative FVU drop that makes a tied checkpoint worth keeping (and resets the patience)."""
    # Reduce-on-plateau: the last part of the FVU comes from smaller steps, not more of them.
    lr_drops: NonNegativeInt = 2
    """Plateaus answered by lowering the learning rate before training stops."""
    lr_drop_factor: PositiveFloat = 0.3
    """Learning-rate multiplier at each plateau."""
    # General models have one sample per user only: a fixed large batch would leave a handful of steps per epoch.
    batch_size: NonNegativeInt = 0
    """Rows per step (0 = enough for about 32 steps per epoch, between 64 and 4096)."""
    # Tiny epochs (one sample per user) would otherwise spend more time selecting than training.
    select_every: NonNegativeInt = 0
    """Epochs between checkpoint evaluations (0 = one per SELECT_SAMPLES training samples, at most one per epoch)."""
    seed: NonNegativeInt = 0
    """Seed of the initialisation and the batch order."""
    device: str = "cpu"
    """cpu or cuda."""
    progress: bool = True
    """Progress bars on stderr."""

    def __post_init__(self) -> None:
        check_fields(self)
        name = type(self).__name__
        if self.k > self.n_latents:
            raise ConfigError(f"{name}.k {self.k} exceeds {name}.n_latents {self.n_latents}")
        if self.batch_size == 1:
            raise ConfigError(f"{name}.batch_size must be 0 (auto) or >= 2: FVU needs a batch variance")
        if not self.lr_drop_factor < 1:
            raise ConfigError(f"{name}.lr_drop_factor must be below 1, got {self.lr_drop_factor}")
        if not (self.select_tolerance < 1 and self.min_fvu_gain < 1):
            raise ConfigError(
                f"{name}.select_tolerance and {name}.min_fvu_gain must be below 1, got "
                f"{self.select_tolerance}, {self.min_fvu_gain}"
            )

    @property
    def max_seconds(self) -> float | None:
        """The wall-clock safety stop in seconds; None without one."""
        return self.max_minutes * 60 if self.max_minutes else None

    def resolve(self, n_samples: int) -> SAETrainConfig:
        """This run on `n_samples` training rows, with every derived value settled: the batch size and the selection
        cadence picked when left at 0, AuxK's dead window capped at one epoch. Resolving twice changes nothing."""
        if n_samples < 1:
            raise ConfigError("no activations to train on")
        return dataclasses.replace(
            self,
            batch_size=self.batch_size or min(max(n_samples // 32, 64), 4096),
            select_every=self.select_every or max(1, -(-SELECT_SAMPLES // n_samples)),
            dead_after=min(self.dead_after, n_samples),
        )

    def sae_config(self, d_in: int) -> SAEConfig:
        """The architecture this run trains, for activations of width `d_in` (resolve first: dead_after is saved)."""
        from recsae_core.sae.model import SAEConfig  # here, not above: model imports torch

        return SAEConfig(d_in=d_in, n_latents=self.n_latents, k=self.k, dead_after=self.dead_after)
