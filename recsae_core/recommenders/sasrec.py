"""SASRec (Kang & McAuley 2018): h is the causal transformer's output at the last position of the history."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recsae_core.recommenders.base import Batch, Recommender, RecommenderConfig


@dataclass
class SASRecConfig(RecommenderConfig):
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256
    dropout: float = 0.5


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2)) / math.sqrt(dim // self.n_heads) + mask
        attn = self.dropout(attn.softmax(-1))
        return self.out((attn @ v).transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    """Post-norm transformer block as in RecBole's SASRec (residual, LayerNorm, GELU feed-forward)."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.attention = CausalSelfAttention(config.dim, config.n_heads, config.dropout)
        self.norm1 = nn.LayerNorm(config.dim, eps=1e-12)
        self.ff = nn.Sequential(
            nn.Linear(config.dim, config.inner_size),
            nn.GELU(),
            nn.Linear(config.inner_size, config.dim),
            nn.Dropout(config.dropout),
        )
        self.norm2 = nn.LayerNorm(config.dim, eps=1e-12)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x, mask)))
        return self.norm2(x + self.ff(x))


class SASRec(Recommender):
    name = "sasrec"
    sequential = True
    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__(config)
        self.config: SASRecConfig = config
        self.pad = config.n_items
        self.item_embedding = nn.Embedding(config.n_items + 1, config.dim, padding_idx=self.pad)
        self.position_embedding = nn.Embedding(config.max_len, config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """Outputs at every position, (B, L, dim); position t sees items 0..t (left padding is masked out)."""
        length = history.shape[1]
        positions = torch.arange(length, device=history.device)
        x = self.item_embedding(history) + self.position_embedding(positions)[None]
        x = self.dropout(self.norm(x))
        valid = history != self.pad
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=history.device))
        allowed = causal[None] & valid[:, None, :]
        # A large finite negative (not -inf) keeps fully padded rows finite instead of NaN.
        mask = torch.where(allowed, 0.0, -1e9)[:, None].to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def represent(self, batch: Batch) -> torch.Tensor:
        return self.encode(batch.history)[:, -1]

    def item_embeddings(self) -> torch.Tensor:
        return self.item_embedding.weight[: self.config.n_items]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy over all items at every non-padded position (the original SASRec's all-position training)."""
        out = self.encode(batch["history"])
        targets = batch["targets"]
        valid = targets != self.pad
        logits = out[valid] @ self.item_embeddings().T
        return F.cross_entropy(logits, targets[valid])

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss is a mean over the non-padded target positions, not over rows."""
        return int((batch["targets"] != self.pad).sum())

    def export_module(self) -> nn.Module:
        return SequenceEncoder(self)


class SequenceEncoder(nn.Module):
    """history (B, L) int64 -> h (B, dim), the exported form of SASRec."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.model.encode(history)[:, -1]
