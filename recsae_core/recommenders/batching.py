"""Model inputs for a set of users: padded histories, batches, and masks of what each user has seen."""

from __future__ import annotations

import numpy as np
import torch

from recsae_core.data.splits import Ragged
from recsae_core.recommenders.base import Batch, Recommender


def pad_histories(rows: list[np.ndarray], max_len: int, pad: int) -> np.ndarray:
    """Left-padded (B, max_len) int64 histories keeping each row's most recent max_len items."""
    out = np.full((len(rows), max_len), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        tail = row[-max_len:]
        if len(tail):
            out[i, max_len - len(tail) :] = tail
    return out


def make_batch(model: Recommender, users: np.ndarray, seen: Ragged, device: str | torch.device) -> Batch:
    """The model input for `users`, whose histories are their `seen` items."""
    user_tensor = torch.as_tensor(users, dtype=torch.long, device=device)
    if model.sequential:
        history = pad_histories([seen.row(u) for u in users], model.config.max_len, model.config.n_items)
        return Batch(user_tensor, torch.as_tensor(history, device=device))
    return Batch(user_tensor, torch.zeros((len(users), 0), dtype=torch.long, device=device))


def mask_seen(scores: torch.Tensor, users: np.ndarray, seen: Ragged) -> torch.Tensor:
    """Set scores of already-seen items to -inf, in place."""
    rows = np.repeat(np.arange(len(users)), seen.lengths[users])
    cols = np.concatenate([seen.row(u) for u in users]) if len(users) else np.zeros(0, np.int64)
    scores[torch.as_tensor(rows), torch.as_tensor(cols)] = -torch.inf
    return scores
