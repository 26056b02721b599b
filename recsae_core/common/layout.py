"""The run folder's layout: where every step writes, and whether a step's output is complete and valid.

The one owner of folder and file names. A run folder is:

    RUN/recommender/   config.json, model.safetensors, metrics.json     (train-recommender)
                       or, for a recommender trained elsewhere (import), its contract:
                       config.json, metrics.json, model.onnx, items.safetensors, recipe.json,
                       item_map.csv [, user_map.csv] [, user_inputs.safetensors], data/ (the log and tables)
    RUN/probe/         meta.json, shard-*.safetensors                    (probe)
                       or meta.json alone, the shards at --activations (a local path or a pyarrow filesystem URI)
    RUN/sae/           cfg.json, sae_weights.safetensors, latent_stats.safetensors, metrics.json   (train-sae)
    RUN/concepts/      catalog.json, report.html, llm_cache/             (interpret)
    RUN/policies/      <target>.json                                     (debias)
    RUN/debias/        <target>.json, report.html                        (debias)
                       concepts.json                                     (concept-control)
    RUN/bundle/        manifest.json + the files it lists with their sha256   (bundle)

and recommender/, probe/, sae/, concepts/ and policies/ each hold complete.json (common.artifacts.RECORD).

Every step writes its outputs atomically and records completion last (common.artifacts: the folder's RECORD, the
sha256 of every file in it; a bundle's manifest with its own digest), so a step killed at any point leaves either
the previous complete state or one the checks below find unfinished. The `verify_*` methods are the only place that
decides it: IncompleteError for a step to (re)run, ArtifactError naming the file whose bytes changed since. A
recommender folder written before records existed has none and is checked by presence only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsae_core.common.artifacts import (
    RECORD,
    check_digests,
    check_record,
    folder_files,
    read_json,
    read_record,
    remove_stale_temps,
    sha256_file,
)
from recsae_core.common.errors import ArtifactError, IncompleteError
from recsae_core.common.storage import check_shards, recorded_store

CONFIG = "config.json"
"""A recommender's architecture and data context."""
MODEL_WEIGHTS = "model.safetensors"
"""A recommender's weights (trained in-house)."""
CONTRACT_ONNX = "model.onnx"
"""A recommender's ONNX model, inputs -> h (the contract every recommender, imported or trained here, is read by)."""
CONTRACT_ITEMS = "items.safetensors"
"""A recommender's item matrix E (`item_embeddings`) and optional `item_bias`: scores = h E^T + b."""
RECIPE = "recipe.json"
"""A recommender's input recipe (recommenders.recipe), its maps beside it under the names below."""
ITEM_MAP = "item_map.csv"
"""The model's item id map: item_id,index (row of E)."""
USER_MAP = "user_map.csv"
"""The model's user id map: user_id,index (user_index recipes; optional for custom)."""
USER_INPUTS = "user_inputs.safetensors"
"""Precomputed model inputs, one row per user (custom recipes)."""
CONTRACT_FILES = (CONTRACT_ONNX, CONTRACT_ITEMS, RECIPE, ITEM_MAP)
"""What every recommender's folder holds besides config and metrics."""
IMPORTED_DATA = "data"
"""Folder inside an imported recommender's: copies of the interaction log and tables it was imported with."""
METRICS = "metrics.json"
"""What a training step measured (recommender/ and sae/)."""
PROBE_META = "meta.json"
"""The probe's sample count, width and shard list."""
PROBE_ACTIVATIONS = "activations"
"""Field of probe/meta.json: where the shards are when not in the probe folder (a local path or a pyarrow filesystem
URI, common.storage); absent when they are in it."""
PROBE_SHARD_FILES = "shard_files"
"""Field of probe/meta.json beside PROBE_ACTIVATIONS: {shard name: {"sha256", "bytes"}}, what the folder's record
says of the shards it holds."""
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
CONCEPT_CONTROL = "concepts.json"
"""Concept control measured per catalog concept (RUN/debias/; recsae_core.concepts.control)."""
REPORT = "report.html"
"""A step's HTML report (concepts/ and debias/)."""
LLM_CACHE = "llm_cache"
"""Cached language-model answers, so a stopped interpret run resumes."""
MANIFEST = "manifest.json"
"""A bundle's manifest: format, shapes and every file's sha256."""
MADE_FROM = "made_from"
"""Field of probe/meta.json, sae/metrics.json and a bundle's provenance: the `identity` of each input folder the step
read, so a step whose input was redone since (a run killed after `--force` redid an earlier step) reads as stale."""
MANIFEST_DIGEST = "manifest_sha256"
"""The manifest's field holding the sha256 of the rest of it (`manifest_digest`), so no byte of a bundle is
unchecked."""


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

    @property
    def concept_control(self) -> Path:
        return self.debias / CONCEPT_CONTROL

    def policy(self, target: str) -> Path:
        return self.policies / f"{target}.json"

    def policy_files(self) -> list[Path]:
        """The run's policies; each that `debias` recorded is checked against its sha256 (ArtifactError naming a
        changed one), a file put there by hand is taken as it is."""
        paths = sorted(p for p in self.policies.glob("*.json") if p.name != RECORD)
        if not paths or not (self.policies / RECORD).is_file():
            return paths
        recorded = read_record(self.policies)
        for path in paths:
            if path.name in recorded and sha256_file(path) != recorded[path.name]:
                raise ArtifactError(f"{path}: sha256 does not match {self.policies / RECORD} (corrupt or modified)")
        return paths

    @property
    def imported_data(self) -> Path:
        return self.recommender / IMPORTED_DATA

    @property
    def recommender_model(self) -> Path:
        """The file that is the recommender: its weights (in-house) or its ONNX model (imported). Policies and
        bundles record its sha256."""
        weights = self.recommender / MODEL_WEIGHTS
        return weights if weights.is_file() else self.recommender / CONTRACT_ONNX

    def identity(self, folder: Path) -> str:
        """What a later step records about an input folder: the sha256 of its completion record (so of every file
        in it); for a recommender written before records existed, of its model file."""
        if (folder / RECORD).is_file():
            return sha256_file(folder / RECORD)
        if folder == self.recommender and self.recommender_model.is_file():
            return sha256_file(self.recommender_model)
        raise IncompleteError(f"{folder / RECORD}: missing")

    def made_from(self, *folders: Path) -> dict[str, str]:
        """The MADE_FROM entry of a step that read `folders` of this run: {folder name: identity} of those there (a
        probe written outside a run, as tests do, was made from nothing this run holds)."""
        return {folder.name: self.identity(folder) for folder in folders if folder.is_dir()}

    def _check_made_from(self, recorded: Any, where: Path, *folders: Path) -> None:
        if recorded != self.made_from(*folders):
            names = " and ".join(f"{f.name}/" for f in folders)
            raise IncompleteError(f"{where}: made from another {names} than the run holds now")

    def remove_stale_temps(self) -> list[str]:
        """What killed writes left in the run folder and its step folders (one pipeline per run at a time)."""
        folders = (self.root, self.recommender, self.probe, self.sae, self.concepts, self.policies, self.debias)
        return [name for folder in folders for name in remove_stale_temps(folder)]

    def recommender_complete(self) -> bool:
        """Trained or imported: metrics readable and every contract file present (a run trained here also keeps its
        PyTorch weights; one written before it carried a contract is upgraded by `recommenders.run.add_contract`)."""
        return _passes(self.verify_recommender)

    def verify_recommender(self) -> None:
        """`recommender_complete`, and every file matching the folder's record when it has one (ArtifactError)."""
        folder = self.recommender
        if not folder.is_dir():
            raise IncompleteError(f"{folder}: no trained recommender here (train one, or 'recsae import' one)")
        if (folder / RECORD).is_file():
            check_record(folder)
        try:
            read_json(folder / METRICS)
        except ArtifactError as err:
            raise IncompleteError(str(err)) from None
        if missing := [name for name in CONTRACT_FILES if not (folder / name).is_file()]:
            raise IncompleteError(f"{folder / missing[0]}: missing")

    def needs_contract(self) -> bool:
        """A run trained here before recsae wrote its ONNX contract: weights and metrics, but no recipe."""
        folder = self.recommender
        return all((folder / name).is_file() for name in (MODEL_WEIGHTS, METRICS)) and not (folder / RECIPE).is_file()

    def probe_complete(self) -> bool:
        """Probed: meta and every shard it lists recorded and intact."""
        return _passes(self.verify_probe)

    def verify_probe(self, activations: str | None = None) -> dict[str, Any]:
        """The probe's meta, once the folder matches its record and was made from the run's recommender, itself
        intact; with `activations` (a ShardStore's uri), once its shards are there too. Like every check below, it
        checks the step's inputs too: a step is finished only on finished ones."""
        meta = verify_probe_folder(self.probe)
        if activations is not None and meta.get(PROBE_ACTIVATIONS) != activations:
            where = meta.get(PROBE_ACTIVATIONS) or f"{self.probe}"
            raise IncompleteError(f"{self.probe / PROBE_META}: its shards are at {where}, not at {activations}")
        if self.recommender.is_dir():
            self.verify_recommender()
        self._check_made_from(meta.get(MADE_FROM), self.probe / PROBE_META, self.recommender)
        return meta

    def sae_complete(self) -> bool:
        """SAE trained: architecture, weights, statistics and metrics recorded and intact."""
        return _passes(self.verify_sae)

    def verify_sae(self) -> dict[str, str]:
        """The SAE folder's recorded files, once they match and it was trained on the run's probe as it is now."""
        files = check_record(self.sae, required=(*SAE_FILES, METRICS))
        metrics = read_json(self.sae / METRICS)
        self.verify_probe()
        self._check_made_from(metrics.get(MADE_FROM) if isinstance(metrics, dict) else None, self.sae / METRICS,
                              self.probe)  # fmt: skip
        return files

    def catalog_complete(self) -> bool:
        """Catalog recorded, intact, and built from the run's current SAE weights (a retrained SAE makes it stale)."""
        return _passes(self.verify_catalog)

    def verify_catalog(self) -> dict[str, Any]:
        """The catalog, once it and its report match the concepts folder's record and it was built from the SAE the
        run holds now (IncompleteError when stale: the SAE was retrained after it)."""
        check_record(self.concepts, required=(CATALOG, REPORT), exhaustive=False)  # llm_cache/ is a cache
        catalog = read_json(self.catalog)
        weights = self.verify_sae()[SAE_WEIGHTS]
        try:
            recorded = catalog["run"]["sae"]["weights_sha256"]
        except (KeyError, TypeError):
            raise ArtifactError(f"{self.catalog}: lacks run.sae.weights_sha256") from None
        if not catalog.get("concepts") or recorded != weights:
            raise IncompleteError(f"{self.catalog}: built for another SAE than {self.sae / SAE_WEIGHTS}")
        return catalog

    def bundle_complete(self) -> bool:
        """Bundle written and intact: every file its manifest lists is there with its recorded sha256."""
        return _passes(self.verify_bundle)

    def verify_bundle(self) -> dict[str, Any]:
        """The run's bundle, once intact (`bundle_files_intact`) and made from the run's recommender and SAE, with
        the run's catalog and policies as they are now (IncompleteError when any was redone or changed since)."""
        if not self.bundle.is_dir():
            raise IncompleteError(f"{self.bundle}: not written")
        manifest = bundle_files_intact(self.bundle)
        if self.catalog.is_file():  # and what they were made from
            self.verify_catalog()
        else:
            self.verify_sae()
        provenance = manifest.get("provenance")
        made = provenance.get(MADE_FROM) if isinstance(provenance, dict) else None
        self._check_made_from(made, self.bundle / MANIFEST, self.recommender, self.sae)
        copies = (f"concepts/{CATALOG}", "policies/")
        bundled = {k: v for k, v in manifest["files"].items() if k.startswith(copies)}
        run = {f"policies/{p.name}": sha256_file(p) for p in self.policy_files()}
        if self.catalog.is_file():
            run[f"concepts/{CATALOG}"] = sha256_file(self.catalog)
        if bundled != run:
            raise IncompleteError(f"{self.bundle / MANIFEST}: made from another catalog or other policies than "
                                  f"{self.concepts} and {self.policies} hold now")  # fmt: skip
        return manifest


def _passes(verify: Any) -> bool:
    try:
        verify()
    except ArtifactError:
        return False
    return True


def probe_folder_complete(folder: Path) -> bool:
    """A probe folder (a run's, or an import's work folder) whose meta and listed shards are recorded and intact."""
    return _passes(lambda: verify_probe_folder(folder))


def verify_probe_folder(folder: Path) -> dict[str, Any]:
    """A probe folder's meta, once the folder matches its record and the record covers every shard the meta lists:
    in the folder, or at the location PROBE_ACTIVATIONS names, each with the sha256 and size PROBE_SHARD_FILES
    records (ArtifactError naming the first shard missing or changed there)."""
    files = check_record(folder, required=(PROBE_META,))
    meta = read_json(folder / PROBE_META)
    shards = meta.get("shards") if isinstance(meta, dict) else None
    if not isinstance(shards, list) or not shards:
        raise ArtifactError(f"{folder / PROBE_META}: lists no shards")
    if isinstance(location := meta.get(PROBE_ACTIVATIONS), str):
        store = recorded_store(location, folder / PROBE_META)
        check_shards(store, shards, meta.get(PROBE_SHARD_FILES), folder / PROBE_META)
    elif missing := [name for name in shards if name not in files]:
        raise ArtifactError(f"{folder / missing[0]}: listed in {folder / PROBE_META} but not in {folder / RECORD}")
    return meta


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The sha256 of a manifest's content without its own digest field (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def bundle_files_intact(folder: Path) -> dict[str, Any]:
    """The bundle's manifest, after checking that its content matches its own digest, that every file it lists
    exists and matches its sha256, and that it lists every file there; raises ArtifactError naming the first file
    that does not. The bundle stage's verify_bundle adds the format checks."""
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no bundle folder here")
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or MANIFEST_DIGEST not in manifest:
        raise ArtifactError(f"{folder / MANIFEST}: no {MANIFEST_DIGEST} (not a bundle, or written by an older "
                            "recsae: rebuild it with 'recsae bundle')")  # fmt: skip
    if manifest_digest(manifest) != manifest[MANIFEST_DIGEST]:
        raise ArtifactError(f"{folder / MANIFEST}: content does not match its {MANIFEST_DIGEST} (corrupt or modified)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{folder / MANIFEST}: missing field 'files'")
    if extra := [name for name in folder_files(folder) if name != MANIFEST and name not in files]:
        raise ArtifactError(f"{folder / extra[0]}: not listed in {folder / MANIFEST} (added after it was written)")
    check_digests(folder, files, "the manifest")
    return manifest
