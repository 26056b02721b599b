"""A run folder: one recommender and everything derived from it (probe, SAE, concepts, policies, bundle).

The recommender is trained here (`train_step`) or imported (recommenders.imported.import_step). Either way its folder
holds the same contract (ONNX model, item matrix, input recipe), and `load_run` reads that contract into the same
RunContext: every later step sees one kind of recommender, whoever trained it."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recsae_core.common.artifacts import RECORD, atomic_folder, check_record, read_json, write_json, write_record
from recsae_core.common.errors import ArtifactError, ConfigError
from recsae_core.common.layout import CONFIG, CONTRACT_ITEMS, CONTRACT_ONNX, METRICS, RECIPE, RunLayout
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.data.datasets import Dataset, load_dataset
from recsae_core.data.splits import Split, make_split
from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.checkpoint import load_recommender, save_recommender
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.contract_export import write_contract
from recsae_core.recommenders.evaluate import evaluate, popularity_baseline
from recsae_core.recommenders.imported import SOURCE, load_imported
from recsae_core.recommenders.onnx_model import OnnxRecommender, read_contract
from recsae_core.recommenders.registry import MODELS
from recsae_core.recommenders.train import build_model, train_recommender


@dataclass
class RunContext:
    """A trained recommender with the exact data it was trained and evaluated on."""

    root: Path
    """The run folder."""
    dataset: Dataset
    """The filtered dataset."""
    split: Split
    """The split the recommender was trained on."""
    model: Recommender
    """The recommender as its contract (`OnnxRecommender`), in eval mode."""
    config: dict[str, Any]
    """recommender/config.json."""


def resolve_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device '{device}': expected cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but this torch build sees no CUDA device")
    return device


def prepare_data(dataset: str, model: str, protocol: str, seed: int) -> tuple[Dataset, Split]:
    if model not in MODELS:
        raise ConfigError(f"unknown model '{model}': expected one of {', '.join(MODELS)}")
    data = load_dataset(dataset)
    return data, make_split(data, protocol, MODELS[model].sequential, seed)


def train_step(
    run_dir: Path, dataset: str, model_name: str, protocol: str, config: TrainConfig,
    ray_config: RayConfig | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train a recommender into RUN_DIR/recommender (written atomically, by this process alone) and return its
    metrics: in this process, or on Ray Train's workers when `ray_config` names a cluster (`train_on_ray`)."""
    config.device = resolve_device(config.device)
    data, split = prepare_data(dataset, model_name, protocol, config.seed)
    torch.manual_seed(config.seed)  # the initial weights: the same in every process, so a run can be repeated
    model = build_model(model_name, data.n_users, data.n_items, split)
    if ray_config is not None and ray_config.on_ray:
        from recsae_core.recommenders.train_on_ray import train_recommender_on_ray

        result = train_recommender_on_ray(model, split, config, ray_config, storage_beside=run_dir)
    else:
        result = train_recommender(model, split, config)
    test = evaluate(model, split, "test", device=config.device)
    resolved = config.resolved(model_name)
    metrics = {
        "dataset": dataset,
        "model": model_name,
        "protocol": protocol,
        "split": "leave-one-out by time" if split.sequential else "per-user random 8:1:1",
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_interactions": data.n_interactions,
        "epochs_trained": result.epochs_trained,
        "best_epoch": result.best_epoch,
        "train_seconds": result.seconds,
        "seconds_per_epoch": result.seconds_per_epoch,
        "device": config.device,
        "seed": config.seed,
        "hyperparameters": {k: getattr(resolved, k) for k in ("batch_size", "lr", "weight_decay", "patience")},
        "valid": result.best_valid,
        "test": test,
        "popularity_baseline_test": popularity_baseline(split, "test"),
        "history": result.history,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    metrics["ray_workers"] = result.ray_workers  # 0: in this process
    context = {
        "dataset": dataset,
        "protocol": protocol,
        "seed": config.seed,
        "filters": data.filters,
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_interactions": data.n_interactions,
    }
    with atomic_folder(RunLayout(run_dir).recommender) as folder:
        save_recommender(model.cpu(), folder, context)
        metrics["contract_parity"] = write_contract(model, data, split.train, folder)
        write_json(folder / METRICS, metrics)
    return metrics


def add_contract(run_dir: Path) -> dict[str, Any]:
    """Give a run trained before recsae wrote contracts its ONNX contract, from its checkpoint, without retraining.
    The files are written aside and moved in with the recipe last: a kill leaves the run as it was or complete."""
    folder = RunLayout(run_dir).recommender
    recorded = (folder / RECORD).is_file()
    if recorded:
        check_record(folder)  # never re-seal a changed file
    model, config = load_recommender(folder)
    data, split = prepare_data(config["dataset"], model.name, config["protocol"], config["seed"])
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".contract-") as work:
        parity = write_contract(model, data, split.train, Path(work))
        names = sorted(p.name for p in Path(work).iterdir())
        for name in [n for n in names if n != RECIPE] + [RECIPE]:
            os.replace(Path(work) / name, folder / name)
    metrics = read_json(folder / METRICS)
    metrics["contract_parity"] = parity
    write_json(folder / METRICS, metrics)
    if recorded:
        write_record(folder)
    return parity


def load_run(run_dir: Path, device: str = "cpu", threads: int = 0) -> RunContext:
    """Reload a run's recommender as its contract (trained here: on the dataset it names; imported: on its copied
    data) and rebuild its data and split; fails with a clear message if anything is off. `threads` bounds ONNX
    Runtime. A run trained before contracts existed gets one from its checkpoint first (`add_contract`)."""
    folder = RunLayout(run_dir).recommender
    if not (folder / CONFIG).is_file():
        raise ArtifactError(f"{folder}: no trained recommender here (train one, or 'recsae import' one)")
    config = read_json(folder / CONFIG)
    if isinstance(config, dict) and config.get("source") == SOURCE:
        if not RunLayout(run_dir).recommender_complete():
            raise ArtifactError(f"{folder}: incomplete imported recommender (metrics or contract files missing)")
        for key in ("protocol", "seed"):
            if key not in config:
                raise ArtifactError(f"{folder / CONFIG}: missing '{key}'")
        imported, data = load_imported(folder, config, threads)
        split = make_split(data, config["protocol"], imported.sequential, config["seed"])
        return RunContext(root=run_dir, dataset=data, split=split, model=imported.to(resolve_device(device)),
                          config=config)  # fmt: skip
    if RunLayout(run_dir).needs_contract():
        add_contract(run_dir)
    if not RunLayout(run_dir).recommender_complete():
        raise ArtifactError(f"{folder}: incomplete recommender (metrics or contract files missing); train it again")
    spec = config.get("recommender") if isinstance(config, dict) else None
    for key in ("dataset", "protocol", "seed"):
        if key not in config:
            raise ArtifactError(f"{folder / CONFIG}: missing '{key}'")
    name = spec.get("model") if isinstance(spec, dict) else None
    data, split = prepare_data(config["dataset"], str(name), config["protocol"], config["seed"])
    if (data.n_users, data.n_items) != (config.get("n_users"), config.get("n_items")):
        raise ArtifactError(
            f"{folder / CONFIG}: the run has {config.get('n_users')} users / {config.get('n_items')} items, but "
            f"dataset '{config['dataset']}' now gives {data.n_users} / {data.n_items}"
        )
    contract = read_contract(folder / CONTRACT_ONNX, folder / CONTRACT_ITEMS, folder / RECIPE, threads)
    model = OnnxRecommender(contract, data, name=str(name)).to(resolve_device(device)).eval()
    return RunContext(root=run_dir, dataset=data, split=split, model=model, config=config)
