"""A validated RecommendRequest -> the engine's Row: ids to indices, concepts to latents, policies to edits.

Everything a request can get wrong past its schema is found here and raised as RequestError (404 unknown user, 422
invalid or unknown history items, 409 SAE off), before the request joins a batch.
"""

from __future__ import annotations

import numpy as np

from recsae_core.bundle.format import Bundle
from service.engine import Row
from service.errors import RequestError
from service.schemas import RecommendRequest
from service.steering import Catalog


class RequestParser:
    """Resolves requests against one bundle's users, items, concepts and policies."""

    def __init__(self, bundle: Bundle, catalog: Catalog) -> None:
        self.bundle, self.catalog = bundle, catalog
        self.item_index = {str(item): i for i, item in enumerate(bundle.items["ids"])}
        self.user_index = {str(user): u for u, user in enumerate(bundle.user_ids)}

    def parse(self, request: RecommendRequest, sae: bool = True, steering_enabled: bool = True) -> Row:
        """The request as a Row. With the steering kill switch on (steering_enabled false) edits are validated but
        not applied."""
        steering = request.steering
        wants_sae = (steering is not None and not steering.empty) or request.explain
        if wants_sae and not sae:
            raise RequestError(409, "steering and explain need the SAE, which this deployment runs with sae=false")
        row = Row(k=request.k, exclude_seen=request.exclude_seen, explain=request.explain)
        if request.user_id is not None:
            user = self.user_index.get(str(request.user_id))
            if user is None:
                raise RequestError(404, f"unknown user_id '{request.user_id}'")
            row.user = user
        else:
            row.history = self._history(request.history or [])
        if steering is not None and not steering.empty:
            edits = [self.catalog.edit(e.latent, e.concept, e.op, e.value, e.unit) for e in steering.edits]
            resolved = self.catalog.resolve_steering(steering.policy, edits)
            row.policy = steering.policy
            row.suppressed = not steering_enabled
            row.edits = resolved if steering_enabled else []
            if steering.policy is not None and steering_enabled:
                policy = self.catalog.policy(steering.policy)
                row.transform = policy.fitted
                if steering.strength is not None:
                    row.strength = steering.strength
                    # resolve_steering puts the policy's edits first
                    row.edit_weights = [steering.strength] * len(policy.edits) + [1.0] * len(edits) or None
        return row

    def _history(self, history: list[str | int]) -> np.ndarray:
        spec = self.bundle.inputs
        if spec.kind == "custom" or (spec.kind == "history" and not spec.feeds_histories):
            raise RequestError(422, "this bundle's model takes custom inputs; only known user_ids can be served")
        if spec.kind == "user" and self.bundle.foldin is None:
            raise RequestError(422, "this bundle has no fold-in map for new users; only known user_ids work")
        items, unknown = [], []
        for raw in history:
            index = self.item_index.get(str(raw))
            if index is None:
                unknown.append(str(raw))
            else:
                items.append(index)
        if unknown:
            raise RequestError(422, unknown_items(unknown))
        return np.asarray(items, dtype=np.int64)


def unknown_items(ids: list[str]) -> str:
    """One line naming every unknown id once, in request order (repr keeps an id with a newline on one line)."""
    distinct = list(dict.fromkeys(ids))
    plural = "s" if len(distinct) > 1 else ""
    return f"unknown item id{plural} {', '.join(repr(raw) for raw in distinct)} in history"
