"""How to train a recommender: one dataclass (the CLI's train flags derive from it) and the per-model defaults."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from recsae_core.common.ranges import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_fields

# Per-model defaults, measured on ML-1M (docs/benchmarks.md): large-batch Adam gets each model to RecBole's level
# within the 20-minute CPU budget.
DEFAULTS: dict[str, dict] = {
    "bprmf": {"batch_size": 4096, "lr": 1e-3, "weight_decay": 0.0},
    "lightgcn": {"batch_size": 4096, "lr": 2e-3, "weight_decay": 0.0},
    "sasrec": {"batch_size": 256, "lr": 1e-3, "weight_decay": 0.0},
}


@dataclass
class TrainConfig:
    """How to train; fields left None take the model's defaults from DEFAULTS."""

    epochs: PositiveInt = 300
    """Upper bound; early stopping usually ends sooner."""
    batch_size: PositiveInt | None = None
    """Training examples per step (unset = the model's default)."""
    lr: PositiveFloat | None = None
    """Learning rate of Adam (unset = the model's default)."""
    weight_decay: NonNegativeFloat | None = None
    """Adam's weight decay (unset = the model's default)."""
    patience: PositiveInt = 10
    """Evaluations without a validation NDCG@10 gain before training stops."""
    eval_every: PositiveInt = 1
    """Epochs between two validation evaluations."""
    seed: NonNegativeInt = 2020
    """Seed of the split, the initialisation and the sampling."""
    device: str = "cpu"
    """cpu or cuda."""
    progress: bool = True
    """Progress bars on stderr."""

    def __post_init__(self) -> None:
        check_fields(self)

    def resolved(self, model_name: str) -> TrainConfig:
        out = copy.copy(self)
        for key, value in DEFAULTS[model_name].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        return out
