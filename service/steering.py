"""Concept names and policies of a bundle, resolved to latents and edit lists once, when the bundle loads."""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recsae_core.bundle.format import Bundle
from recsae_core.common.errors import ConfigError
from recsae_core.debias.bias_metrics import head_mask
from recsae_core.sae.edits import OPS, UNITS, Edit, EditBounds, validate_edits
from recsae_core.sae.stats import LatentStats
from service.errors import RequestError

log = logging.getLogger("recsae.service")


def suggest(name: str, choices: list[str], what: str) -> str:
    """ "unknown concept 'dram'; did you mean 'drama'?" (or the first few known names)."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    if not close:
        lowered = {c.casefold(): c for c in choices}
        close = [lowered[c] for c in difflib.get_close_matches(name.casefold(), list(lowered), n=3, cutoff=0.6)]
    if close:
        return f"unknown {what} '{name}'; did you mean {' or '.join(repr(c) for c in close)}?"
    if not choices:
        return f"unknown {what} '{name}'; this bundle has no {what}s"
    shown = ", ".join(repr(c) for c in choices[:5])
    return f"unknown {what} '{name}'; known {what}s include {shown}" + (" ..." if len(choices) > 5 else "")


@dataclass
class Policy:
    """A bundled policy: resolved edits, or why it cannot be used."""

    name: str
    description: str
    edits: list[Edit]
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


class Catalog:
    """Concept name <-> latent, and the bundle's policies as validated edit lists."""

    def __init__(self, bundle: Bundle, stats: LatentStats, n_latents: int, bounds: EditBounds) -> None:
        self.n_latents = n_latents
        self.concepts: list[dict[str, Any]] = []
        self.by_name: dict[str, dict[str, Any]] = {}
        self.latent_name: dict[int, str] = {}
        for entry in (bundle.catalog or {}).get("concepts", []):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            latent = entry.get("latent")
            if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < n_latents:
                log.warning("catalog concept %r has no valid latent (%r); skipped", entry.get("name"), latent)
                continue
            key = entry["name"].casefold()
            if key in self.by_name:
                log.warning(
                    "catalog concept name %r appears twice; the first (latent %d) is kept",
                    entry["name"],
                    self.by_name[key]["latent"],
                )
                continue
            self.concepts.append(entry)
            self.by_name[key] = entry
            self.latent_name.setdefault(latent, entry["name"])
        self.names = [c["name"] for c in self.concepts]
        self.policies: dict[str, Policy] = {}
        self.identity = bundle_identity(bundle.manifest)
        for name, body in bundle.policies.items():
            self.policies[name] = self._policy(name, body, stats, bounds)

    def concept(self, name: str) -> dict[str, Any]:
        entry = self.by_name.get(name.casefold())
        if entry is None:
            raise RequestError(404, suggest(name, self.names, "concept"))
        return entry

    def policy(self, name: str) -> Policy:
        policy = self.policies.get(name)
        if policy is None:
            raise RequestError(422, suggest(name, sorted(self.policies), "policy"))
        if policy.error:
            raise RequestError(422, f"policy '{name}' cannot be used with this bundle: {policy.error}")
        return policy

    def edit(self, latent: int | None, concept: str | None, op: str, value: float, unit: str) -> Edit:
        if concept is not None:
            entry = self.by_name.get(concept.casefold())
            if entry is None:
                raise RequestError(422, suggest(concept, self.names, "concept"))
            latent = int(entry["latent"])
        if latent is None or not 0 <= latent < self.n_latents:
            raise RequestError(422, f"latent {latent} out of range [0, {self.n_latents})")
        return Edit(int(latent), op, float(value), unit)

    def describe(self, latent: int) -> str:
        name = self.latent_name.get(latent)
        return f"latent {latent}" + (f" (concept '{name}')" if name else "")

    def _policy(self, name: str, body: Any, stats: LatentStats, bounds: EditBounds) -> Policy:
        description = str(body.get("description", "")) if isinstance(body, dict) else ""
        raw = body if isinstance(body, dict) else {}
        try:
            if problem := identity_mismatch(raw.get("made_for"), self.identity):
                raise ConfigError(problem)
            entries = raw.get("edits")
            if not isinstance(entries, list) or not entries:
                raise ConfigError("needs a non-empty 'edits' list")
            edits = []
            for i, entry in enumerate(entries):
                if not isinstance(entry, dict):
                    raise ConfigError(f"edit {i} is not an object")
                op, unit = entry.get("op"), entry.get("unit", "raw")
                if op not in OPS or unit not in UNITS:
                    raise ConfigError(f"edit {i}: op {op!r} / unit {unit!r} not supported")
                value = entry.get("value", 0.0)
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ConfigError(f"edit {i}: value must be a finite number")
                concept = entry.get("concept")
                latent = entry.get("latent")
                try:
                    edits.append(self.edit(latent, concept, op, value, unit))
                except RequestError as err:
                    raise ConfigError(f"edit {i}: {err.message}") from None
            validate_edits(edits, self.n_latents, bounds, stats)
        except ConfigError as err:
            log.warning("policy %r is unusable: %s", name, err)
            return Policy(name, description, [], str(err), raw)
        return Policy(name, description, edits, None, raw)

    def resolve_steering(
        self, policy: str | None, edits: list[Edit], bounds: EditBounds, stats: LatentStats
    ) -> list[Edit]:
        """Policy edits + request edits, refusing two edits on one latent and anything outside the bounds."""
        if policy is not None and not edits:
            # A bundled policy was validated against these bounds and statistics when the bundle was loaded (the
            # engine, and with it this catalog, is rebuilt whenever either changes).
            return list(self.policy(policy).edits)
        combined: list[Edit] = []
        owner: dict[int, str] = {}
        if policy is not None:
            for edit in self.policy(policy).edits:
                combined.append(edit)
                owner[edit.latent] = f"policy '{policy}'"
        for i, edit in enumerate(edits):
            if edit.latent in owner:
                raise RequestError(
                    422,
                    f"edit {i} on {self.describe(edit.latent)} conflicts with {owner[edit.latent]}, which "
                    "already edits it; one edit per latent",
                )
            owner[edit.latent] = f"edit {i}"
            combined.append(edit)
        try:
            return validate_edits(combined, self.n_latents, bounds, stats)
        except ConfigError as err:
            raise RequestError(422, f"steering: {err}") from None

    def concept_summary(self, entry: dict[str, Any], stats: LatentStats) -> dict[str, Any]:
        latent = int(entry["latent"])
        out = {k: v for k, v in entry.items() if isinstance(v, str | int | float | bool | type(None))}
        out.update(
            latent=latent,
            frequency=float(stats.frequency[latent]),
            mean_activation=float(stats.mean_activation[latent]),
            max_activation=float(stats.max_activation[latent]),
            std_activation=float(stats.std_activation[latent]),
        )
        return out


def bundle_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a policy's `made_for` is checked against: the SAE weights' sha256 (copied byte-identical from the run),
    dataset and model type, and the recommender checkpoint's sha256 when the manifest's provenance records it."""
    files = manifest.get("files", {}) if isinstance(manifest.get("files"), dict) else {}
    provenance = manifest.get("provenance", {}) if isinstance(manifest.get("provenance"), dict) else {}
    return {
        "sae_sha256": files.get("sae/sae_weights.safetensors"),
        "dataset": manifest.get("dataset"),
        "model_type": manifest.get("model_type"),
        "recommender_sha256": provenance.get("recommender_sha256"),
    }


def identity_mismatch(made_for: Any, identity: dict[str, Any]) -> str | None:
    """Why a policy made for another model or SAE must be refused (None when it matches, or when the policy,
    written by hand, records no `made_for`). Keys the bundle cannot tell are not compared."""
    if made_for is None:
        return None
    if not isinstance(made_for, dict):
        return "'made_for' must be an object"
    if not made_for.get("sae_sha256"):
        return "'made_for' lacks 'sae_sha256'; cannot tell which SAE the policy was made for"
    for key in ("sae_sha256", "recommender_sha256", "dataset", "model_type"):
        want, have = made_for.get(key), identity.get(key)
        if want is not None and have is not None and str(want) != str(have):
            short = (lambda v: str(v)[:16]) if key.endswith("sha256") else str
            what = key.removesuffix("_sha256").replace("_", " ")
            return (
                f"made for {what} {short(want)}, but this bundle has {short(have)}; "
                "re-run 'recsae debias' on the bundle's run to make a policy for it"
            )
    return None


def head_items(popularity: np.ndarray, share: float = 0.2) -> np.ndarray:
    """Boolean mask of the head: the most popular items holding `share` of training interactions; the rest is tail.
    The same definition as the offline bias metrics, so served and offline tail shares agree."""
    return head_mask(popularity, share)
