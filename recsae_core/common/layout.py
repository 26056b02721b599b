"""The run folder's layout: where every step writes, and whether a step's output is complete and valid.

The one owner of folder and file names. A run folder is:

    RUN/recommender/   config.json, model.safetensors, metrics.json     (train-recommender)
                       or, for a recommender trained elsewhere (import), its contract:
                       config.json, metrics.json, model.onnx, items.safetensors, recipe.json,
                       item_map.csv [, user_map.csv] [, user_inputs.safetensors], data/ (the log and tables)
    RUN/probe/         meta.json, shard-*.safetensors                    (probe)
    RUN/sae/           cfg.json, sae_weights.safetensors, latent_stats.safetensors, metrics.json   (train-sae)
    RUN/concepts/      catalog.json, report.html, llm_cache/             (interpret)
    RUN/policies/      <target>.json                                     (debias)
    RUN/debias/        <target>.json, report.html                        (debias)
    RUN/bundle/        manifest.json + the files it lists with their sha256   (bundle)

Every step writes its folder atomically (common.artifacts), so "complete" means "the files the next step reads are
there and readable"; the checks below are the only place that decides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsae_core.common.artifacts import read_json, sha256_file
from recsae_core.common.errors import ArtifactError

CONFIG = "config.json"
"""A recommender's architecture and data context."""
MODEL_WEIGHTS = "model.safetensors"
"""A recommender's weights (trained in-house)."""
CONTRACT_ONNX = "model.onnx"
"""An imported recommender's ONNX model, inputs -> h."""
CONTRACT_ITEMS = "items.safetensors"
"""An imported recommender's item matrix E (`item_embeddings`) and optional `item_bias`: scores = h E^T + b."""
RECIPE = "recipe.json"
"""An imported recommender's input recipe (recommenders.recipe), its maps beside it under the names below."""
ITEM_MAP = "item_map.csv"
"""The model's item id map: item_id,index (row of E)."""
USER_MAP = "user_map.csv"
"""The model's user id map: user_id,index (user_index recipes; optional for custom)."""
USER_INPUTS = "user_inputs.safetensors"
"""Precomputed model inputs, one row per user (custom recipes)."""
CONTRACT_FILES = (CONTRACT_ONNX, CONTRACT_ITEMS, RECIPE, ITEM_MAP)
"""What every imported recommender's folder holds besides config and metrics."""
IMPORTED_DATA = "data"
"""Folder inside an imported recommender's: copies of the interaction log and tables it was imported with."""
METRICS = "metrics.json"
"""What a training step measured (recommender/ and sae/)."""
PROBE_META = "meta.json"
"""The probe's sample count, width and shard list."""
SAE_CFG = "cfg.json"
"""The SAE's architecture (SAELens layout)."""
SAE_WEIGHTS = "sae_weights.safetensors"
"""The SAE's parameters (SAELens names)."""
STATS_FILE = "latent_stats.safetensors"
"""Per-latent statistics beside an SAE (in a run and in a bundle)."""
SAE_FILES = (SAE_CFG, SAE_WEIGHTS, STATS_FILE)
"""What a bundle copies from the run's sae/."""
CATALOG = "catalog.json"
"""The concept catalog."""
REPORT = "report.html"
"""A step's HTML report (concepts/ and debias/)."""
LLM_CACHE = "llm_cache"
"""Cached language-model answers, so a stopped interpret run resumes."""
MANIFEST = "manifest.json"
"""A bundle's manifest: format, shapes and every file's sha256."""


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder."""

    root: Path
    """The run folder."""

    @property
    def recommender(self) -> Path:
        return self.root / "recommender"

    @property
    def probe(self) -> Path:
        return self.root / "probe"

    @property
    def sae(self) -> Path:
        return self.root / "sae"

    @property
    def concepts(self) -> Path:
        return self.root / "concepts"

    @property
    def policies(self) -> Path:
        return self.root / "policies"

    @property
    def debias(self) -> Path:
        return self.root / "debias"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def catalog(self) -> Path:
        return self.concepts / CATALOG

    def policy(self, target: str) -> Path:
        return self.policies / f"{target}.json"

    def policy_files(self) -> list[Path]:
        return sorted(self.policies.glob("*.json"))

    @property
    def imported_data(self) -> Path:
        return self.recommender / IMPORTED_DATA

    @property
    def recommender_model(self) -> Path:
        """The file that is the recommender: its weights (in-house) or its ONNX model (imported). Policies and
        bundles record its sha256."""
        weights = self.recommender / MODEL_WEIGHTS
        return weights if weights.is_file() else self.recommender / CONTRACT_ONNX

    def recommender_complete(self) -> bool:
        """Trained or imported: metrics readable, and the weights or every contract file present."""
        try:
            read_json(self.recommender / METRICS)
        except ArtifactError:
            return False
        if (self.recommender / MODEL_WEIGHTS).is_file():
            return True
        return all((self.recommender / name).is_file() for name in CONTRACT_FILES)

    def probe_complete(self) -> bool:
        """Probed: meta readable and every shard it lists present."""
        return probe_folder_complete(self.probe)

    def sae_complete(self) -> bool:
        """SAE trained: architecture, weights, statistics and metrics present."""
        return all((self.sae / name).is_file() for name in (*SAE_FILES, METRICS))

    def catalog_complete(self) -> bool:
        """Catalog built from the run's current SAE weights (a retrained SAE makes it stale)."""
        try:
            catalog = read_json(self.catalog)
            recorded = catalog["run"]["sae"]["weights_sha256"]
            return bool(catalog.get("concepts")) and recorded == sha256_file(self.sae / SAE_WEIGHTS)
        except (ArtifactError, KeyError, TypeError, OSError):
            return False

    def bundle_complete(self) -> bool:
        """Bundle written and intact: every file its manifest lists is there with its recorded sha256."""
        try:
            bundle_files_intact(self.bundle)
        except ArtifactError:
            return False
        return True


def probe_folder_complete(folder: Path) -> bool:
    """A probe folder (a run's, or an import's work folder) whose meta and listed shards are all there."""
    try:
        meta = read_json(folder / PROBE_META)
    except ArtifactError:
        return False
    return isinstance(meta, dict) and all((folder / s).is_file() for s in meta.get("shards", []))


def bundle_files_intact(folder: Path) -> dict[str, Any]:
    """The bundle's manifest, after checking that every file it lists exists and matches its sha256; raises
    ArtifactError naming the first file that does not. The bundle stage's verify_bundle adds the format checks."""
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no bundle folder here")
    manifest = read_json(folder / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ArtifactError(f"{folder / MANIFEST}: missing field 'files'")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing (partial bundle?)")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path}: sha256 does not match the manifest (corrupt or modified)")
    return manifest
