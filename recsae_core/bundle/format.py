"""The bundle: the one verified folder the service loads.

Layout (every file's sha256 is in manifest.json):
  manifest.json                 format, version, dataset, model type, d, n_items, inputs, SAE config, file hashes
  model.onnx                    the representation model: the recommender's own inputs -> h (dynamic batch axis)
  items.safetensors             item_embeddings (n_items, d) [+ item_bias (n_items,)] [+ foldin (d, n_items)]
                                [+ model_index (n_items,): each item's index in the model's own id space]
  items.json                    ids, titles, genres, years, training popularity
  users.safetensors             per-user model inputs (row = user) and seen items (CSR: seen_indptr, seen_items)
  users.json                    user ids (dense index -> raw id)
  sae/                          cfg.json + sae_weights.safetensors (SAELens layout) + latent_stats.safetensors
  concepts/catalog.json         optional, from `recsae interpret`
  policies/<name>.json          optional, from `recsae debias`
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from recsae_core.bundle.inputs import InputSpec, check_history_inputs, check_model_index
from recsae_core.common.artifacts import atomic_folder, read_json, sha256_file, write_json
from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import MANIFEST, MANIFEST_DIGEST, SAE_FILES, bundle_files_intact, manifest_digest

FORMAT = "recsae-bundle"
FORMAT_VERSION = 1


@dataclass
class BundleContents:
    """Everything needed to write a bundle; `write_bundle` checks consistency before anything touches disk."""

    onnx_path: Path
    """An ONNX file mapping the model's inputs to h."""
    inputs: InputSpec
    """How to feed it."""
    item_embeddings: np.ndarray
    """(n_items, d) float32."""
    item_ids: list[str]
    """Raw item ids."""
    titles: list[str]
    """Item titles."""
    genres: list[list[str]]
    """Genre tokens per item."""
    popularity: np.ndarray
    """Training-interaction count per item."""
    user_ids: list[str]
    """Raw user ids."""
    user_inputs: dict[str, np.ndarray]
    """Per-user model inputs keyed by ONNX input name, first axis = user."""
    seen: tuple[np.ndarray, np.ndarray]
    """(indptr, items): each user's known items, excluded from their recommendations on request."""
    sae_folder: Path
    """Folder with cfg.json, sae_weights.safetensors, latent_stats.safetensors."""
    meta: dict[str, Any]
    """dataset, model, and any provenance to record in the manifest."""
    item_bias: np.ndarray | None = None
    """Optional (n_items,) score bias."""
    foldin: np.ndarray | None = None
    """Optional (d, n_items) map from a history indicator vector to h, for 'user' models asked about new users."""
    years: np.ndarray | None = None
    """Optional release years (-1 unknown)."""
    catalog_path: Path | None = None
    """Optional concepts/catalog.json."""
    policy_paths: list[Path] = field(default_factory=list)
    """Optional policy JSON files."""
    model_index: np.ndarray | None = None
    """Optional (n_items,) int64 each item's index in the model's own id space; None: the dense item index."""


def write_bundle(contents: BundleContents, out: Path, parity: dict[str, float] | None = None) -> dict[str, Any]:
    """Write a bundle atomically (temp folder, then rename) and return its manifest."""
    c = contents
    n_items, d = c.item_embeddings.shape
    if len(c.item_ids) != n_items or len(c.titles) != n_items or len(c.popularity) != n_items:
        raise ArtifactError(f"item metadata covers {len(c.item_ids)} items but the embedding matrix has {n_items}")
    n_users = len(c.user_ids)
    for name, values in c.user_inputs.items():
        if len(values) != n_users:
            raise ArtifactError(f"user input '{name}' has {len(values)} rows for {n_users} users")
    if len(c.seen[0]) != n_users + 1:
        raise ArtifactError(f"seen-items index has {len(c.seen[0]) - 1} users, expected {n_users}")
    # The checks load_bundle makes, made before writing: a bundle is never written that would then be refused.
    spec = InputSpec.from_manifest(c.inputs.to_manifest(), Path("bundle inputs"))
    if missing := [name for name in spec.names if name not in c.user_inputs]:
        raise ArtifactError(f"user inputs lack the model input(s) {missing}")
    model_index = None if c.model_index is None else check_model_index(c.model_index, n_items, spec, "bundle items")
    if spec.feeds_histories:
        check_history_inputs(spec, c.user_inputs, model_index, n_items, "bundle user inputs")
    sae_cfg = read_json(c.sae_folder / "cfg.json")
    if int(sae_cfg.get("d_in", -1)) != d:
        raise ArtifactError(f"{c.sae_folder / 'cfg.json'}: SAE d_in={sae_cfg.get('d_in')} but the model's d={d}")
    with atomic_folder(out, record=False) as tmp:  # the manifest is the bundle's record
        (tmp / "model.onnx").write_bytes(c.onnx_path.read_bytes())
        tensors = {"item_embeddings": np.ascontiguousarray(c.item_embeddings, dtype=np.float32)}
        if c.item_bias is not None:
            tensors["item_bias"] = np.ascontiguousarray(c.item_bias, dtype=np.float32)
        if c.foldin is not None:
            tensors["foldin"] = np.ascontiguousarray(c.foldin, dtype=np.float32)
        if model_index is not None:
            tensors["model_index"] = np.ascontiguousarray(model_index)
        save_file(tensors, str(tmp / "items.safetensors"))
        years = c.years.tolist() if c.years is not None else [-1] * n_items
        items = {"ids": c.item_ids, "titles": c.titles, "genres": c.genres, "years": years,
                 "popularity": [int(p) for p in c.popularity]}  # fmt: skip
        (tmp / "items.json").write_text(json.dumps(items))
        users = {k: np.ascontiguousarray(v) for k, v in c.user_inputs.items()}
        users["seen_indptr"] = np.ascontiguousarray(c.seen[0], dtype=np.int64)
        users["seen_items"] = np.ascontiguousarray(c.seen[1], dtype=np.int64)
        save_file(users, str(tmp / "users.safetensors"))
        (tmp / "users.json").write_text(json.dumps({"ids": c.user_ids}))
        (tmp / "sae").mkdir()
        for name in SAE_FILES:
            source = c.sae_folder / name
            if not source.is_file():
                raise ArtifactError(f"{source}: missing (train the SAE first)")
            (tmp / "sae" / name).write_bytes(source.read_bytes())
        if c.catalog_path is not None:
            (tmp / "concepts").mkdir()
            (tmp / "concepts" / "catalog.json").write_bytes(c.catalog_path.read_bytes())
        if c.policy_paths:
            (tmp / "policies").mkdir()
            for path in c.policy_paths:
                (tmp / "policies" / path.name).write_bytes(path.read_bytes())
        written = [p for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST]
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in written}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dataset": c.meta.get("dataset"),
            "model_type": c.meta.get("model"),
            "d": int(d),
            "n_items": int(n_items),
            "n_users": int(n_users),
            "inputs": spec.to_manifest(),
            "sae": {k: sae_cfg.get(k) for k in ("d_in", "d_sae", "architecture", "activation_fn_kwargs")},
            "parity": parity or {},
            "provenance": {k: v for k, v in c.meta.items() if k not in ("dataset", "model")},
            "files": files,
            "versions": bundle_versions(files),
        }
        manifest = write_manifest(tmp, manifest)
    return manifest


def bundle_versions(files: dict[str, str]) -> dict[str, str | None]:
    """The version ids of a bundle whose files have these sha256s: the whole bundle, its model, SAE and catalog."""
    return {
        "bundle": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16],
        "model": files["model.onnx"][:16],
        "sae": files["sae/sae_weights.safetensors"][:16],
        "catalog": files.get("concepts/catalog.json", "")[:16] or None,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write a bundle's manifest with the digest of its content (MANIFEST_DIGEST), last; returns what was written."""
    sealed = {**{k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}, MANIFEST_DIGEST: manifest_digest(manifest)}
    write_json(folder / MANIFEST, sealed)
    return sealed


def verify_bundle(folder: Path) -> dict[str, Any]:
    """Check format, version, completeness and every hash; return the manifest or raise ArtifactError."""
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no bundle folder here")
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{folder / MANIFEST}: not a recsae bundle manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{folder / MANIFEST}: bundle format version {version!r} is not supported "
            f"(this recsae reads {FORMAT_VERSION})"
        )
    for key in ("d", "n_items", "n_users", "inputs", "files", "versions"):
        if key not in manifest:
            raise ArtifactError(f"{folder / MANIFEST}: missing field '{key}'")
    files = manifest["files"]
    for required in ("model.onnx", "items.safetensors", "items.json", "users.safetensors", "users.json",
                     *(f"sae/{n}" for n in SAE_FILES)):  # fmt: skip
        if required not in files:
            raise ArtifactError(f"{folder / MANIFEST}: file list lacks '{required}'")
    bundle_files_intact(folder)
    InputSpec.from_manifest(manifest["inputs"], folder / MANIFEST)
    return manifest


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except (SafetensorError, FileNotFoundError, OSError) as err:
        raise ArtifactError(f"{path}: cannot read tensors ({err})") from None


@dataclass
class Bundle:
    """A verified bundle in memory (the ONNX session is opened by whoever serves it, with its own thread count)."""

    folder: Path
    """Where it was loaded from."""
    manifest: dict[str, Any]
    """The verified manifest."""
    inputs: InputSpec
    """How to feed the model."""
    item_embeddings: np.ndarray
    """(n_items, d) float32."""
    item_bias: np.ndarray | None
    """(n_items,) or None."""
    foldin: np.ndarray | None
    """(d, n_items) or None."""
    items: dict[str, list]
    """ids, titles, genres, years, popularity."""
    user_ids: list[str]
    """Dense user index -> raw id."""
    user_inputs: dict[str, np.ndarray]
    """Per-user model inputs."""
    seen_indptr: np.ndarray
    """CSR index of each user's known items."""
    seen_items: np.ndarray
    """CSR values of each user's known items."""
    catalog: dict[str, Any] | None
    """The concept catalog, if bundled."""
    policies: dict[str, dict[str, Any]]
    """Policies by name."""
    model_index: np.ndarray | None = None
    """(n_items,) int64 each item's index in the model's own id space (what a history feeds for it); None: the
    dense item index."""

    @property
    def model_path(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def sae_folder(self) -> Path:
        return self.folder / "sae"

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    def seen(self, user: int) -> np.ndarray:
        return self.seen_items[self.seen_indptr[user] : self.seen_indptr[user + 1]]


def load_bundle(folder: Path) -> Bundle:
    """Verify and load a bundle; any inconsistency raises ArtifactError naming the file and the problem."""
    manifest = verify_bundle(folder)
    d, n_items, n_users = int(manifest["d"]), int(manifest["n_items"]), int(manifest["n_users"])
    inputs = InputSpec.from_manifest(manifest["inputs"], folder / MANIFEST)
    items_t = read_tensors(folder / "items.safetensors")
    emb = items_t.get("item_embeddings")
    if emb is None or emb.shape != (n_items, d):
        shape = None if emb is None else emb.shape
        raise ArtifactError(
            f"{folder / 'items.safetensors'}: item_embeddings has shape {shape}, expected {(n_items, d)}"
        )
    bias, foldin = items_t.get("item_bias"), items_t.get("foldin")
    if bias is not None and bias.shape != (n_items,):
        raise ArtifactError(f"{folder / 'items.safetensors'}: item_bias has shape {bias.shape}, expected ({n_items},)")
    if foldin is not None and foldin.shape != (d, n_items):
        raise ArtifactError(f"{folder / 'items.safetensors'}: foldin has shape {foldin.shape}, expected {(d, n_items)}")
    model_index = items_t.get("model_index")
    if model_index is not None:
        model_index = check_model_index(model_index, n_items, inputs, str(folder / "items.safetensors"))
    items = read_json(folder / "items.json")
    for key in ("ids", "titles", "genres", "popularity"):
        if len(items.get(key, [])) != n_items:
            raise ArtifactError(f"{folder / 'items.json'}: '{key}' does not list {n_items} items")
    user_ids = read_json(folder / "users.json").get("ids", [])
    if len(user_ids) != n_users:
        raise ArtifactError(f"{folder / 'users.json'}: lists {len(user_ids)} users, manifest says {n_users}")
    users_t = read_tensors(folder / "users.safetensors")
    indptr, seen_items = users_t.pop("seen_indptr", None), users_t.pop("seen_items", None)
    if indptr is None or seen_items is None or len(indptr) != n_users + 1 or indptr[-1] != len(seen_items):
        raise ArtifactError(f"{folder / 'users.safetensors'}: seen_indptr/seen_items missing or inconsistent")
    for name in inputs.names:
        if name not in users_t or len(users_t[name]) != n_users:
            raise ArtifactError(f"{folder / 'users.safetensors'}: no per-user rows for model input '{name}'")
    if inputs.feeds_histories:
        check_history_inputs(inputs, users_t, model_index, n_items, str(folder / "users.safetensors"))
    sae_cfg = read_json(folder / "sae" / "cfg.json")
    if int(sae_cfg.get("d_in", -1)) != d:
        raise ArtifactError(f"{folder / 'sae' / 'cfg.json'}: SAE d_in={sae_cfg.get('d_in')} but the model's d={d}")
    catalog_path = folder / "concepts" / "catalog.json"
    catalog = read_json(catalog_path) if catalog_path.is_file() else None
    policies = {p.stem: read_json(p) for p in sorted((folder / "policies").glob("*.json"))}
    return Bundle(
        folder=folder,
        manifest=manifest,
        inputs=inputs,
        item_embeddings=emb,
        item_bias=bias,
        foldin=foldin,
        items=items,
        user_ids=user_ids,
        user_inputs=users_t,
        seen_indptr=indptr,
        seen_items=seen_items,
        catalog=catalog,
        policies=policies,
        model_index=model_index,
    )
