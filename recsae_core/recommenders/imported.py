"""Importing a recommender trained elsewhere: its contract (ONNX model, item matrix, input recipe) checked against the
interaction log and tables as users have them, then written into RUN/recommender/ with copies of those files and the
wrapped model's own evaluation, so that every later step runs on the run folder alone; and reloading such a run.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from recsae_core.common.artifacts import atomic_folder, write_json
from recsae_core.common.errors import ArtifactError, ConfigError, DataError
from recsae_core.common.layout import (
    CONFIG,
    CONTRACT_ITEMS,
    CONTRACT_ONNX,
    IMPORTED_DATA,
    METRICS,
    RECIPE,
    RunLayout,
)
from recsae_core.common.ray_cluster import RayConfig, cluster_workers
from recsae_core.common.ray_map import ByReference, item_map
from recsae_core.data.datasets import Dataset
from recsae_core.data.imported import load_imported_dataset
from recsae_core.data.splits import PROTOCOLS, Split, make_split
from recsae_core.recommenders.evaluate import evaluate_stages, popularity_baseline
from recsae_core.recommenders.onnx_model import Contract, OnnxRecommender, read_contract

SOURCE = "import"
"""config.json's `source` for an imported recommender (in-house runs have none)."""
DATA_ROLES = ("interactions", "items", "users")
"""The data files an import takes, copied as data/<role><suffix> (the suffix decides the format)."""


def load_contract_data(contract: Contract, files: dict[str, Path | None], name: str) -> tuple[Dataset, dict[str, Any]]:
    """The Dataset in the model's id space (dense item i = the item map's row i; users restricted to the model's
    user map when it has one) and the import report (rows read, kept, skipped)."""
    user_ids = None if contract.users is None else contract.users.ids
    interactions = files["interactions"]
    assert interactions is not None
    dataset, report = load_imported_dataset(
        interactions, contract.recipe.items.ids, user_ids=user_ids, items=files.get("items"),
        users=files.get("users"), name=name,
    )  # fmt: skip
    return dataset, report.as_dict()


@dataclass(frozen=True)
class ImportSource:
    """The files and settings an import reads: what its model and split travel to Ray's workers as (each worker
    reads the same files, so they must be on storage every node mounts)."""

    onnx: Path
    """The ONNX model, inputs -> h."""
    item_embeddings: Path
    """The item matrix (safetensors)."""
    recipe: Path
    """The input recipe (JSON)."""
    files: dict[str, Path | None]
    """The data files by role (interactions, items, users)."""
    name: str
    """The dataset name recorded in the run."""
    protocol: str
    """The split protocol."""
    seed: int
    """The split's seed."""

    def load(self, threads: int = 0) -> ImportedModel:
        """The contract checked against the data (one line naming what is wrong), the model and its split."""
        contract = read_contract(self.onnx, self.item_embeddings, self.recipe, threads)
        dataset, report = load_contract_data(contract, self.files, self.name)
        model = OnnxRecommender(contract, dataset).eval()
        split = make_split(dataset, self.protocol, model.sequential, self.seed)
        return ImportedModel(self, contract, dataset, model, split, report)

    def absolute(self) -> ImportSource:
        """The same source with absolute paths (a Ray worker does not start in this process's folder)."""
        files = {role: None if path is None else Path(path).resolve() for role, path in self.files.items()}
        return replace(self, onnx=self.onnx.resolve(), item_embeddings=self.item_embeddings.resolve(),
                       recipe=self.recipe.resolve(), files=files)  # fmt: skip


@dataclass
class ImportedModel:
    """An import's recommender before its run folder is written."""

    source: ImportSource
    """What it was read from."""
    contract: Contract
    """The checked contract."""
    dataset: Dataset
    """The data in the model's id space."""
    model: OnnxRecommender
    """The contract as a Recommender, in eval mode."""
    split: Split
    """The split every later step evaluates on."""
    report: dict[str, Any]
    """The import report: rows read, kept, skipped."""


IMPORT_BY_SOURCE: ByReference = {ImportedModel: (lambda imported: imported.source.absolute(),
                                                 lambda source: source.load(threads=1))}  # fmt: skip
"""`item_map(..., by_reference=IMPORT_BY_SOURCE)`: an import's model travels as its source files, and every actor
loads it once (single-threaded: one CPU per actor)."""


def import_step(
    run_dir: Path,
    onnx: Path,
    item_embeddings: Path,
    recipe: Path,
    interactions: Path,
    items: Path | None = None,
    users: Path | None = None,
    name: str | None = None,
    protocol: str = "recbole",
    seed: int = 2020,
    threads: int = 0,
    ray_config: RayConfig | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Validate the contract and the data against each other, evaluate the wrapped model on the split the later
    steps use (its batches on an actor pool when `ray_config` names a cluster: the same metrics), and only then
    write RUN_DIR/recommender (atomically). Returns its metrics (the import report)."""
    layout = RunLayout(run_dir)
    steps = (layout.recommender, layout.probe, layout.sae, layout.concepts, layout.policies, layout.debias,
             layout.bundle)  # fmt: skip
    if held := [folder.name for folder in steps if folder.exists()]:
        # A probe or SAE left from another model would pass for this one's and be skipped by the pipeline.
        raise ArtifactError(f"{run_dir}: already holds {', '.join(held)}/; import into a new --out folder")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}': expected one of {', '.join(PROTOCOLS)}")
    files: dict[str, Path | None] = {"interactions": interactions, "items": items, "users": users}
    given = {role: str(path) for role, path in files.items() if path is not None}
    for role, path in files.items():
        if path is not None and not Path(path).is_file():
            raise DataError(f"{path}: {role} file not found")
    name = name or Path(interactions).stem
    rank_on = item_map(ray_config, IMPORT_BY_SOURCE)  # a bad address is refused before the files are read
    started = time.perf_counter()
    imported = ImportSource(Path(onnx), Path(item_embeddings), Path(recipe), files, name, protocol, seed).load(threads)
    contract, dataset, model, split, report = (imported.contract, imported.dataset, imported.model, imported.split,
                                               imported.report)  # fmt: skip
    if not (split.test.lengths > 0).any():
        raise DataError(f"{interactions}: no user has enough interactions the model knows to hold one out for "
                        "testing (leave-one-out needs 3 per user, the random split about 10)")  # fmt: skip
    evaluated = evaluate_stages(imported, ("valid", "test"), rank_on, progress=progress)
    valid, test = evaluated["valid"], evaluated["test"]
    copies = {role: f"{IMPORTED_DATA}/{role}{Path(path).suffix}" for role, path in files.items() if path is not None}
    context = {
        "source": SOURCE,
        "dataset": name,
        "protocol": protocol,
        "seed": seed,
        "n_users": dataset.n_users,
        "n_items": dataset.n_items,
        "n_interactions": dataset.n_interactions,
        "recommender": model.config_dict(),
        "data": copies,
    }
    metrics = {
        "dataset": name,
        "model": model.name,
        "source": SOURCE,
        "recipe": contract.recipe.kind,
        "protocol": protocol,
        "split": "leave-one-out by time" if split.sequential else "per-user random 8:1:1",
        "n_users": dataset.n_users,
        "n_items": dataset.n_items,
        "n_model_items": len(contract.items.embeddings),
        "n_interactions": dataset.n_interactions,
        "seed": seed,
        "import": report,
        "imported_from": {"onnx": str(onnx), "item_embeddings": str(item_embeddings), "recipe": str(recipe), **given},
        "valid": valid,
        "test": test,
        "popularity_baseline_test": popularity_baseline(split, "test"),
        "ray_workers": cluster_workers(ray_config) if ray_config is not None and ray_config.on_ray else 0,
        "import_seconds": round(time.perf_counter() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_folder(layout.recommender) as folder:
        shutil.copyfile(onnx, folder / CONTRACT_ONNX)
        shutil.copyfile(item_embeddings, folder / CONTRACT_ITEMS)
        contract.recipe.save(folder)
        (folder / IMPORTED_DATA).mkdir()
        for role, path in files.items():
            if path is not None:
                shutil.copyfile(path, folder / copies[role])
        # The copies must stand alone (an ONNX model with external weights would not): read them back first.
        read_contract(folder / CONTRACT_ONNX, folder / CONTRACT_ITEMS, folder / RECIPE, threads)
        write_json(folder / CONFIG, context)
        write_json(folder / METRICS, metrics)
    return metrics


def load_imported(folder: Path, config: dict[str, Any], threads: int = 0) -> tuple[OnnxRecommender, Dataset]:
    """An imported recommender folder's model and the Dataset rebuilt from its copied data files."""
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("interactions"), str):
        raise ArtifactError(f"{folder / CONFIG}: an imported run needs 'data' naming its interactions file")
    if unknown := sorted(set(data) - set(DATA_ROLES)):
        raise ArtifactError(f"{folder / CONFIG}: unknown data file role(s) {unknown}")
    contract = read_contract(folder / CONTRACT_ONNX, folder / CONTRACT_ITEMS, folder / RECIPE, threads)
    files: dict[str, Path | None] = {role: folder / data[role] if role in data else None for role in DATA_ROLES}
    dataset, _ = load_contract_data(contract, files, str(config.get("dataset", "imported")))
    if (dataset.n_users, dataset.n_items) != (config.get("n_users"), config.get("n_items")):
        raise ArtifactError(f"{folder / CONFIG}: recorded {config.get('n_users')} users / {config.get('n_items')} "
                            f"items, but its data now gives {dataset.n_users} / {dataset.n_items}")  # fmt: skip
    return OnnxRecommender(contract, dataset), dataset
