"""The small interface every recommender exposes, so probing and steering never touch model code."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn


class Batch(NamedTuple):
    """What a recommender needs to represent a set of users."""

    users: torch.Tensor
    """int64 (B,) user indices (general and graph models)."""
    history: torch.Tensor
    """int64 (B, L) item histories, left-padded with n_items (sequential models); (B, 0) when unused."""


@dataclass
class RecommenderConfig:
    """Hyper-parameters shared by all recommenders; subclasses add their own."""

    n_users: int
    n_items: int
    dim: int = 64
    max_len: int = 50


class Recommender(nn.Module):
    """A model whose prediction is `score(represent(batch))`, with `score` a dot product with item embeddings."""

    name: ClassVar[str]
    sequential: ClassVar[bool] = False
    config_class: ClassVar[type[RecommenderConfig]] = RecommenderConfig

    def __init__(self, config: RecommenderConfig) -> None:
        super().__init__()
        self.config = config

    def represent(self, batch: Batch) -> torch.Tensor:
        """The activation right before the prediction layer, (B, dim)."""
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:
        """(n_items, dim) matrix that `score` multiplies with."""
        raise NotImplementedError

    def item_bias(self) -> torch.Tensor | None:
        """Optional (n_items,) bias added to every score."""
        return None

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Scores over all items, (B, n_items)."""
        scores = h @ self.item_embeddings().T
        bias = self.item_bias()
        return scores if bias is None else scores + bias

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss for one batch built by the matching sampler in `recsae_core.recommenders.train`."""
        raise NotImplementedError

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms `loss(batch)` is the mean of (its rows here): what weighs a slice of a batch against the
        whole when data-parallel workers each take a slice (`recommenders.train_on_ray`)."""
        return len(next(iter(batch.values())))

    def config_dict(self) -> dict:
        return {"model": self.name, **asdict(self.config)}

    def export_module(self) -> nn.Module:
        """A module mapping the model's own inputs to h, for ONNX export (frozen, eval mode)."""
        raise NotImplementedError
