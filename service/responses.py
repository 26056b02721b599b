"""The JSON the service answers with: a recommendation (items, explanation), a concept's detail, the catalog and
policy listings. Indices become the bundle's ids and names here, and nowhere else."""

from __future__ import annotations

from typing import Any

import numpy as np

from recsae_core.bundle.format import Bundle
from recsae_core.sae.edits import Edit
from recsae_core.sae.runtime import SAERuntime
from service.engine import Row, RowResult
from service.steering import Catalog, Policy


class Responses:
    """Answers for one bundle, from the engine's results and the bundle's names."""

    def __init__(self, bundle: Bundle, catalog: Catalog, sae: SAERuntime, emb_t: np.ndarray) -> None:
        self.catalog, self.sae, self.emb_t = catalog, sae, emb_t
        self.item_ids = [str(i) for i in bundle.items["ids"]]
        self.titles = [str(t) for t in bundle.items["titles"]]
        self.versions: dict[str, str | None] = dict(bundle.manifest.get("versions", {}))

    def recommend(self, row: Row, result: RowResult, explain_top: int = 8) -> dict[str, Any]:
        """POST/GET /v1/recommend (RecommendResponse)."""
        steered = bool(row.edits) or row.transform is not None
        items = []
        for rank, (item, score) in enumerate(zip(result.items, result.scores, strict=True), start=1):
            entry = {"item_id": self.item_ids[item], "title": self.titles[item], "score": float(score), "rank": rank}
            if steered and result.original_ranks is not None:
                entry["original_rank"] = int(result.original_ranks[rank - 1])
            items.append(entry)
        out: dict[str, Any] = {"items": items, "steering_applied": steered, "policy": row.policy}
        if row.suppressed:
            out["steering_suppressed"] = "steering is switched off on this deployment (kill switch)"
        if row.explain:
            out["explanation"] = self.explanation(row, result, explain_top)
        out["versions"] = self.versions
        return out

    def explanation(self, row: Row, result: RowResult, top: int) -> dict[str, Any]:
        """The strongest `top` latents with their levels, and every applied edit with its before/after."""
        latents, values = result.latents[:top], result.activations[:top]
        levels = self.sae.levels(values)
        reports = []
        for latent, value, level in zip(latents, values, levels, strict=True):
            report = {
                "latent": int(latent),
                "concept": self.catalog.latent_name.get(int(latent)),
                "activation": float(value),
                "level": int(level),
            }
            if result.z_new is not None:
                report["steered_activation"] = float(result.z_new[latent])
            reports.append(report)
        edits = []
        for edit, before in zip(row.edits, result.z_edited if result.z_edited is not None else [], strict=False):
            edits.append(
                {
                    **self.edit_summary(edit),
                    "before": float(before),
                    "after": float(result.z_new[edit.latent]),
                }
            )
        out = {"latents": reports, "edits": edits, "l0": len(result.latents), "fvu": result.fvu}
        if row.policy is not None and not row.suppressed:
            out["policy"] = self.policy_report(row, result)
        return out

    def policy_report(self, row: Row, result: RowResult) -> dict[str, Any]:
        """The policy a row was steered by: kind, the strength applied (the policy's x the request's multiplier;
        an edit policy's own strength is 1) and the row's numbers behind the move."""
        policy = self.catalog.policies[row.policy]
        fitted = policy.fitted.strength if policy.fitted is not None else 1.0
        return {"name": policy.name, "kind": policy.kind, "strength": fitted * row.strength,
                "multiplier": row.strength, "detail": result.policy_detail or {}}  # fmt: skip

    def concept_detail(self, name: str, n_items: int = 10) -> dict[str, Any]:
        """GET /v1/concepts/{name}: a concept's statistics and the items its decoder direction raises and lowers most
        (404 for an unknown name)."""
        out = self.catalog.concept_summary(self.catalog.concept(name))
        direction = self.sae.w_dec[out["latent"]] @ self.emb_t
        order = np.argsort(-direction, kind="stable")
        top = [
            {"item_id": self.item_ids[i], "title": self.titles[i], "alignment": float(direction[i])}
            for i in np.concatenate([order[:n_items], order[::-1][:n_items]])
        ]
        out["raises"], out["lowers"] = top[:n_items], top[n_items:]
        out["versions"] = self.versions
        return out

    def concepts(self) -> dict[str, Any]:
        """GET /v1/concepts."""
        items = [self.catalog.concept_summary(c) for c in self.catalog.concepts]
        return {"concepts": items, "n_latents": self.sae.n_latents, "versions": self.versions}

    def policies(self) -> dict[str, Any]:
        """GET /v1/policies."""
        return {"policies": [self.policy_summary(p) for p in self.catalog.policies.values()], "versions": self.versions}

    def policy_summary(self, policy: Policy) -> dict[str, Any]:
        out = {
            "name": policy.name,
            "description": policy.description,
            "kind": policy.kind,
            "edits": [self.edit_summary(e) for e in policy.edits],
            "usable": policy.error is None,
            "error": policy.error,
        }
        if policy.fitted is not None:
            fitted = policy.fitted
            out.update(strength=fitted.strength, strength_means=fitted.spec.strength, options=fitted.options,
                       fit=fitted.fit)  # fmt: skip
        return out

    def edit_summary(self, edit: Edit) -> dict[str, Any]:
        """An edit as answers and listings show it (also the bench's record of what it steered with)."""
        concept = self.catalog.latent_name.get(edit.latent)
        return {"latent": edit.latent, "concept": concept, "op": edit.op, "value": edit.value, "unit": edit.unit}
