"""Short ML-100K runs trained once per test session and shared by the probe, bundle and CLI test files.

Not a test module (no `test_` prefix). Each run folder holds only `recommender/` when first handed out; the files
that use it must write probes, SAEs and bundles elsewhere, or (test_bundle.py) build them once in a module fixture.
Anything that edits a run's artifacts works on a copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recsae_core.recommenders.run import train_step
from recsae_core.recommenders.train import TrainConfig

# Quality does not matter here, only real weights: the fewest epochs that train a real model.
EPOCHS = {"sasrec": 1, "bprmf": 2}
_RUNS: dict[str, Path] = {}


def trained_run(tmp_path_factory: pytest.TempPathFactory, model: str) -> Path:
    """A run folder with a trained `model` on ML-100K (recbole protocol), trained on first request only."""
    if model not in _RUNS:
        run_dir = tmp_path_factory.mktemp(f"shared-run-{model}")
        train_step(run_dir, "ml-100k", model, "recbole", TrainConfig(epochs=EPOCHS[model], progress=False))
        _RUNS[model] = run_dir
    return _RUNS[model]
