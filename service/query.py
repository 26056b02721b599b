"""GET /v1/recommend: the query-string form of a recommendation request.

    ?user_id=196&k=10&exclude_seen=true&policy=NAME&strength=0.5&ablate=a,b&steer=concept:1.5,other:-2&explain=true

`history` takes comma-separated item ids; `ablate` takes concept names or latent indices; `steer` takes
`target:value` pairs (repeatable, or comma-separated) meaning a nudge of `value` std units; `strength` scales the
policy (steering.strength).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import QueryParams

from service.errors import RequestError
from service.schemas import RecommendRequest, ServiceConfig, validation_message

ALLOWED = ("user_id", "history", "k", "exclude_seen", "policy", "strength", "ablate", "steer", "explain")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise RequestError(422, f"{name}: expected true or false (got {text!r})")


def _tokens(params: QueryParams, name: str) -> list[str]:
    return [t.strip() for value in params.getlist(name) for t in value.split(",") if t.strip()]


def _target(token: str) -> dict[str, Any]:
    return {"latent": int(token)} if token.isdigit() else {"concept": token}


def query_request(params: QueryParams, config: ServiceConfig) -> RecommendRequest:
    unknown = sorted(set(params.keys()) - set(ALLOWED))
    if unknown:
        raise RequestError(422, f"unknown query parameter(s) {unknown}; allowed: {', '.join(ALLOWED)}")
    for name in ("user_id", "k", "exclude_seen", "policy", "strength", "explain"):
        if len(params.getlist(name)) > 1:
            raise RequestError(422, f"{name}: given {len(params.getlist(name))} times; give it once")
    body: dict[str, Any] = {}
    if "user_id" in params:
        body["user_id"] = params["user_id"]
    if "history" in params:
        body["history"] = _tokens(params, "history")
    if "k" in params:
        try:
            body["k"] = int(params["k"])
        except ValueError:
            raise RequestError(422, f"k: expected an integer (got {params['k']!r})") from None
    for name in ("exclude_seen", "explain"):
        if name in params:
            body[name] = _flag(name, params[name])
    edits: list[dict[str, Any]] = [{**_target(t), "op": "ablate"} for t in _tokens(params, "ablate")]
    for token in _tokens(params, "steer"):
        target, sep, value = token.rpartition(":")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not target or not math.isfinite(number):
            raise RequestError(422, f"steer: expected 'concept:value' with a finite number (got {token!r})")
        edits.append({**_target(target), "op": "nudge", "value": number, "unit": "std"})
    if edits or "policy" in params or "strength" in params:
        body["steering"] = {"edits": edits}
        if "policy" in params:
            body["steering"]["policy"] = params["policy"]
        if "strength" in params:
            try:
                body["steering"]["strength"] = float(params["strength"])
            except ValueError:
                raise RequestError(422, f"strength: expected a number (got {params['strength']!r})") from None
    try:
        return RecommendRequest.model_validate(body, context={"config": config})
    except ValidationError as err:
        raise RequestError(422, validation_message(err)) from None
