"""BPR-MF (Rendle et al. 2009): the user embedding is h."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsae_core.recommenders.base import Batch, Recommender, RecommenderConfig


class UserTable(nn.Module):
    """Frozen user -> h lookup, the exported form of models whose h is a per-user vector."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.detach().clone())

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        return self.table[user]


class BPRMF(Recommender):
    name = "bprmf"

    def __init__(self, config: RecommenderConfig) -> None:
        super().__init__(config)
        self.user_embedding = nn.Embedding(config.n_users, config.dim)
        self.item_embedding = nn.Embedding(config.n_items, config.dim)
        nn.init.xavier_normal_(self.user_embedding.weight)
        nn.init.xavier_normal_(self.item_embedding.weight)

    def represent(self, batch: Batch) -> torch.Tensor:
        return self.user_embedding(batch.users)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_embedding.weight

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        user = self.user_embedding(batch["users"])
        pos = (user * self.item_embedding(batch["pos"])).sum(-1)
        neg = (user * self.item_embedding(batch["neg"])).sum(-1)
        return -F.logsigmoid(pos - neg).mean()

    def export_module(self) -> nn.Module:
        return UserTable(self.user_embedding.weight)
