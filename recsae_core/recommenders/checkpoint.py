"""Recommender checkpoints: safetensors weights beside a JSON config (no pickle anywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recsae_core.common.artifacts import read_json, write_json
from recsae_core.common.errors import ArtifactError
from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.lightgcn import LightGCN
from recsae_core.recommenders.registry import MODELS

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_recommender(model: Recommender, folder: Path, context: dict[str, Any]) -> None:
    """Write weights and a config holding the model's hyper-parameters and how its data was made (`context`)."""
    if isinstance(model, LightGCN) and not model.frozen:
        model.freeze()  # the propagated tables are what inference uses; never save them unfilled
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    write_json(folder / CONFIG, {**context, "recommender": model.config_dict()})


def load_recommender(folder: Path, device: str = "cpu") -> tuple[Recommender, dict[str, Any]]:
    """Rebuild a recommender in eval mode from its folder; the config's context comes back with it."""
    config = read_json(folder / CONFIG)
    if not isinstance(config, dict) or not isinstance(config.get("recommender"), dict):
        raise ArtifactError(f"{folder / CONFIG}: expected an object with a 'recommender' object")
    spec = dict(config["recommender"])
    name = spec.pop("model", None)
    if name not in MODELS:
        raise ArtifactError(f"{folder / CONFIG}: unknown model {name!r}; expected one of {sorted(MODELS)}")
    cls = MODELS[name]
    try:
        model = cls(cls.config_class(**spec))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{folder / CONFIG}: bad recommender config ({err})") from None
    try:
        state = load_file(str(folder / WEIGHTS), device=device)
    except (SafetensorError, FileNotFoundError, OSError) as err:
        raise ArtifactError(f"{folder / WEIGHTS}: cannot read weights ({err})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(
            f"{folder / WEIGHTS}: weights do not match the config ({str(err).splitlines()[0]})"
        ) from None
    model.to(device).eval()
    if isinstance(model, LightGCN):
        model.freeze()  # propagated tables were saved with the weights
    return model, config
