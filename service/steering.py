"""Concept names and policies of a bundle, resolved once, when the bundle loads: concepts to latents, edit policies to
validated edit lists, fitted policies (erase, spectral, calibrated, popsteer) to checked arrays
(recsae_core.debias.policy_kinds)."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsae_core.bundle.format import Bundle
from recsae_core.common.errors import ConfigError
from recsae_core.debias.bias_metrics import head_mask
from recsae_core.debias.policy_kinds import EDIT_KINDS, FITTED_KINDS, KINDS, FittedPolicy, parse_policy
from recsae_core.sae.edits import Edit, EditBounds, validate_edits
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
    plural = what.removesuffix("y") + "ies" if what.endswith("y") else what + "s"
    if not choices:
        return f"unknown {what} '{name}'; this bundle has no {plural}"
    shown = ", ".join(repr(c) for c in choices[:5])
    return f"unknown {what} '{name}'; known {plural} include {shown}" + (" ..." if len(choices) > 5 else "")


@dataclass
class Policy:
    """A bundled policy: resolved edits or a fitted transform, or why it cannot be used."""

    name: str
    """The policy file's name without .json."""
    description: str
    """Its description (empty when it has none)."""
    edits: list[Edit]
    """Its edits, resolved to latents and validated (empty when unusable, and for fitted policies)."""
    error: str | None = None
    """Why the policy cannot be used with this bundle (None when it can)."""
    kind: str = "edits"
    """One of recsae_core.debias.policy_kinds.KINDS ('edits' for a file that names none)."""
    fitted: FittedPolicy | None = None
    """The checked transform of a fitted policy (None for edit policies and unusable ones)."""


class Catalog:
    """Concept name <-> latent, and the bundle's policies as validated edit lists. Edits are checked against
    `bounds` and `stats` by recsae_core's validate_edits, the one validation of an edit."""

    def __init__(self, bundle: Bundle, stats: LatentStats, n_latents: int, bounds: EditBounds) -> None:
        self.n_latents, self.stats, self.bounds = n_latents, stats, bounds
        self.d: int | None = int(bundle.manifest["d"]) if "d" in bundle.manifest else None
        """Width of h (a verified bundle's manifest always has it); fitted policies' arrays are checked against it."""
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
            self.policies[name] = self._policy(name, body)

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

    def latent_of(self, concept: str) -> int:
        """The catalogued concept's latent; 422 naming close matches when there is no such concept."""
        entry = self.by_name.get(concept.casefold())
        if entry is None:
            raise RequestError(422, suggest(concept, self.names, "concept"))
        return int(entry["latent"])

    def edit(self, latent: int | None, concept: str | None, op: str, value: float, unit: str) -> Edit:
        """A request's edit with its target resolved to a latent in range (the values are validated with the rest
        of the row's edits, by resolve_steering)."""
        if concept is not None:
            latent = self.latent_of(concept)
        if latent is None or not 0 <= latent < self.n_latents:
            raise RequestError(422, f"latent {latent} out of range [0, {self.n_latents})")
        return Edit(int(latent), op, float(value), unit)

    def describe(self, latent: int) -> str:
        name = self.latent_name.get(latent)
        return f"latent {latent}" + (f" (concept '{name}')" if name else "")

    def _policy(self, name: str, body: Any) -> Policy:
        description = str(body.get("description", "")) if isinstance(body, dict) else ""
        raw = body if isinstance(body, dict) else {}
        kind = raw.get("kind", "edits")
        try:
            if not isinstance(kind, str) or kind not in KINDS:
                kind = str(kind)
                raise ConfigError(f"unknown kind {raw.get('kind')!r}; expected one of {', '.join(KINDS)}")
            if problem := identity_mismatch(raw.get("made_for"), self.identity):
                raise ConfigError(problem)
            if kind in FITTED_KINDS:
                if self.d is None:
                    raise ConfigError("the bundle manifest lacks the width of h; the arrays cannot be checked")
                return Policy(name, description, [], kind=kind, fitted=parse_policy(raw, self.d, self.n_latents))
            entries = raw.get("edits")
            if not isinstance(entries, list) or not entries:
                raise ConfigError("needs a non-empty 'edits' list")
            parsed = [self._policy_edit(i, entry) for i, entry in enumerate(entries)]
            edits = validate_edits(parsed, self.n_latents, self.bounds, self.stats)
            if kind in EDIT_KINDS[1:] and (other := sorted({e.op for e in edits} - {kind})):
                raise ConfigError(f"kind '{kind}' but it also has {', '.join(other)} edits; use kind 'edits'")
        except ConfigError as err:
            log.warning("policy %r is unusable: %s", name, err)
            return Policy(name, description, [], str(err), kind=kind)
        # JSON integers become floats once validated, as a request's values are.
        return Policy(name, description, [Edit(e.latent, e.op, float(e.value), e.unit) for e in edits], kind=kind)

    def _policy_edit(self, i: int, entry: Any) -> Edit:
        """A policy file's edit: a concept name, if given, becomes its latent; other keys than the Edit's fields and
        'concept' are ignored (notes in hand-written policies)."""
        if not isinstance(entry, dict):
            raise ConfigError(f"edit {i} is not an object")
        fields = {key: entry[key] for key in ("latent", "op", "value", "unit") if key in entry}
        if entry.get("concept") is not None:
            try:
                fields["latent"] = self.latent_of(str(entry["concept"]))
            except RequestError as err:
                raise ConfigError(f"edit {i}: {err.message}") from None
        return Edit.from_dict(fields)

    def resolve_steering(self, policy: str | None, edits: list[Edit]) -> list[Edit]:
        """Policy edits + request edits, refusing two edits on one latent and anything outside the bounds."""
        if policy is not None and not edits:
            # A bundled policy was validated against these bounds and statistics when the bundle was loaded (the
            # catalog is rebuilt whenever either changes).
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
            return validate_edits(combined, self.n_latents, self.bounds, self.stats)
        except ConfigError as err:
            raise RequestError(422, f"steering: {err}") from None

    def concept_summary(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A catalogued concept's fields with its latent's statistics."""
        stats, latent = self.stats, int(entry["latent"])
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
