"""Untrained recommenders on real ML-100K shapes, shared by the model tests and the CUDA tests.

Not a test module (no `test_` prefix). The `split_for` fixture that picks each model's split is in conftest.py.
"""

from __future__ import annotations

import torch

from recsae_core.data.datasets import Dataset
from recsae_core.data.splits import Split
from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.lightgcn import LightGCN
from recsae_core.recommenders.train import build_model

MODELS = ("bprmf", "lightgcn", "sasrec")


def untrained(name: str, data: Dataset, split: Split, seed: int = 0) -> Recommender:
    """A freshly initialised model in eval mode, seeded for reproducibility."""
    torch.manual_seed(seed)
    model = build_model(name, data.n_users, data.n_items, split).eval()
    if isinstance(model, LightGCN):
        model.freeze()  # as training leaves it: propagated tables cached for inference
    return model
