"""LightGCN (He et al. 2020): h is the user embedding averaged over graph-propagation layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsae_core.recommenders.base import Batch, Recommender, RecommenderConfig
from recsae_core.recommenders.bprmf import UserTable


@dataclass
class LightGCNConfig(RecommenderConfig):
    n_layers: int = 2
    reg_weight: float = 1e-5


class SymmetricSpMM(torch.autograd.Function):
    """A @ X for a symmetric sparse A: the backward pass is A @ grad, which avoids torch's slow sparse transpose."""

    @staticmethod
    def forward(ctx, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adjacency = adjacency
        return adjacency @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, ctx.adjacency @ grad


def normalized_adjacency(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """Symmetrically normalised user-item bipartite adjacency D^-1/2 A D^-1/2 as a sparse CSR tensor."""
    n = n_users + n_items
    rows = np.concatenate([users, items + n_users])
    cols = np.concatenate([items + n_users, users])
    degree = np.bincount(rows, minlength=n).astype(np.float64)
    inv_sqrt = np.where(degree > 0, degree**-0.5, 0.0)
    values = inv_sqrt[rows] * inv_sqrt[cols]
    coo = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(values).float(), (n, n), check_invariants=True
    ).coalesce()
    return coo.to_sparse_csr()


class LightGCN(Recommender):
    name = "lightgcn"
    config_class = LightGCNConfig

    def __init__(self, config: LightGCNConfig) -> None:
        super().__init__(config)
        self.config: LightGCNConfig = config
        self.user_embedding = nn.Embedding(config.n_users, config.dim)
        self.item_embedding = nn.Embedding(config.n_items, config.dim)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        # Propagated tables, filled by freeze() and saved with the weights so inference needs no graph.
        self.register_buffer("final_users", torch.zeros(config.n_users, config.dim))
        self.register_buffer("final_items", torch.zeros(config.n_items, config.dim))
        self.adjacency: torch.Tensor | None = None
        self.frozen = False

    def set_graph(self, users: np.ndarray, items: np.ndarray) -> None:
        """Build the propagation graph from training interactions only."""
        self.adjacency = normalized_adjacency(users, items, self.config.n_users, self.config.n_items)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.adjacency is None:
            raise RuntimeError("LightGCN needs set_graph() before training")
        adjacency = self.adjacency.to(self.user_embedding.weight.device)
        layer = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        total = layer
        for _ in range(self.config.n_layers):
            layer = SymmetricSpMM.apply(adjacency, layer)
            total = total + layer
        mean = total / (self.config.n_layers + 1)
        return mean[: self.config.n_users], mean[self.config.n_users :]

    def freeze(self) -> None:
        """Cache the propagated tables for inference (call after training, or after loading a checkpoint)."""
        if self.adjacency is not None:
            with torch.no_grad():
                users, items = self.propagate()
            self.final_users.copy_(users)
            self.final_items.copy_(items)
        self.frozen = True

    def train(self, mode: bool = True) -> LightGCN:
        super().train(mode)
        if mode:
            self.frozen = False
        return self

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen:
            return self.final_users, self.final_items
        return self.propagate()

    def represent(self, batch: Batch) -> torch.Tensor:
        return self._tables()[0][batch.users]

    def item_embeddings(self) -> torch.Tensor:
        return self._tables()[1]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        users, items = self.propagate()
        u = users[batch["users"]]
        pos = (u * items[batch["pos"]]).sum(-1)
        neg = (u * items[batch["neg"]]).sum(-1)
        ego = (
            self.user_embedding(batch["users"]).pow(2).sum()
            + self.item_embedding(batch["pos"]).pow(2).sum()
            + self.item_embedding(batch["neg"]).pow(2).sum()
        ) / len(batch["users"])
        return -F.logsigmoid(pos - neg).mean() + self.config.reg_weight * ego

    def export_module(self) -> nn.Module:
        if not self.frozen:
            self.freeze()
        return UserTable(self.final_users)
