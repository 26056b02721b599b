"""The soak's traffic: a seeded schedule of valid and bad requests, each one checked in process first.

Valid kinds must be answered 200, bad kinds 4xx. Every call of the schedule is run through the replica's own request
path here (schema, GET parsing, id/concept/policy resolution, edit bounds), before Ray starts, so a valid call is
known to be valid and a bad one known to be refused: an unexpected status over HTTP is the service's fault, not the
generator's. Kinds a bundle cannot take (no usable policy, no catalogued live concept, a model that takes no
histories) are left out and named in the report.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple
from urllib.parse import urlencode

import numpy as np
from pydantic import ValidationError
from starlette.datastructures import QueryParams

from recsae_core.common.errors import RecsaeError
from service.errors import RequestError
from service.query import query_request
from service.schemas import RecommendRequest, ServiceConfig
from service.served import Served

VALID_KINDS = {"plain_post": 3, "plain_get": 2, "policy": 2, "edit": 2, "explain": 2, "history": 1}
"""Valid kinds and their relative weights in the schedule."""
BAD_KINDS = (
    "unknown_user", "bad_k", "malformed_json", "unknown_policy", "unknown_concept", "edit_out_of_range",
    "oversize_body", "unknown_history_item", "bad_query",
)  # fmt: skip
"""Bad kinds, drawn uniformly; every one must be answered 4xx."""
SCHEDULE_LENGTH = 4096
"""Calls in one schedule; the load generator cycles through it."""
PATH = "/v1/recommend"


class GeneratorError(RecsaeError):
    """The schedule holds a call whose in-process outcome contradicts its kind (a bug in the generator)."""


class Call(NamedTuple):
    """One request of the schedule."""

    kind: str
    """A key of VALID_KINDS or one of BAD_KINDS."""
    valid: bool
    """Whether it must be answered 200 (else 4xx)."""
    method: str
    """'GET' or 'POST'."""
    path: str
    """Path, with the query string for GET."""
    body: bytes | None
    """POST body (None for GET)."""
    check: str | None
    """What a 200 answer must also show: 'steered' (steering_applied true), 'explained' (an explanation), or None."""


class Schedule(NamedTuple):
    """The seeded traffic of one soak."""

    calls: list[Call]
    """SCHEDULE_LENGTH calls in sending order."""
    skipped: dict[str, str]
    """Valid kinds this bundle cannot take, with the reason."""

    def mix(self) -> dict[str, int]:
        """Calls per kind in the schedule."""
        out: dict[str, int] = {}
        for call in self.calls:
            out[call.kind] = out.get(call.kind, 0) + 1
        return dict(sorted(out.items()))


class _Pools:
    """What the generator draws from: users, their logs, usable policies, live catalogued concepts."""

    def __init__(self, served: Served) -> None:
        bundle, catalog = served.bundle, served.catalog
        self.bundle = bundle
        self.item_ids = [str(i) for i in bundle.items["ids"]]
        self.policies = sorted(name for name, p in catalog.policies.items() if p.error is None)
        std = catalog.stats.std_activation.numpy()
        self.concepts = [c["name"] for c in catalog.concepts if std[int(c["latent"])] > 0]
        self.n_latents = catalog.n_latents

    def user(self, rng: np.random.Generator) -> str:
        return str(self.bundle.user_ids[int(rng.integers(len(self.bundle.user_ids)))])

    def history(self, rng: np.random.Generator, most: int) -> list[str]:
        """Up to `most` items of a random user's log, in log order (a user with an empty log is redrawn)."""
        while True:
            seen = self.bundle.seen(int(rng.integers(len(self.bundle.user_ids))))
            if len(seen):
                start = int(rng.integers(max(1, len(seen) - most + 1)))
                return [self.item_ids[i] for i in seen[start : start + most]]


def _post(kind: str, body: dict[str, Any], check: str | None = None, valid: bool = True) -> Call:
    return Call(kind, valid, "POST", PATH, json.dumps(body).encode(), check)


def _get(kind: str, params: dict[str, Any], valid: bool = True) -> Call:
    return Call(kind, valid, "GET", f"{PATH}?{urlencode(params)}", None, None)


def _edit(rng: np.random.Generator, concept: str) -> dict[str, Any]:
    op = ("ablate", "pin", "nudge")[int(rng.integers(3))]
    if op == "ablate":
        return {"concept": concept, "op": op}
    value = round(float(rng.uniform(0.5, 3.0)), 2)
    return {"concept": concept, "op": op, "value": value if op == "pin" else value * rng.choice([-1, 1]), "unit": "std"}


def _valid(kind: str, rng: np.random.Generator, pools: _Pools, config: ServiceConfig) -> Call:
    user, k = pools.user(rng), int(rng.choice([5, 10, 20]))
    if kind == "plain_post":
        return _post(kind, {"user_id": user, "k": k, "exclude_seen": bool(rng.random() < 0.9)})
    if kind == "plain_get":
        return _get(kind, {"user_id": user, "k": k})
    if kind == "policy":
        return _post(kind, {"user_id": user, "k": k, "steering": {"policy": rng.choice(pools.policies)}}, "steered")
    if kind == "edit":
        chosen = rng.choice(len(pools.concepts), size=min(len(pools.concepts), int(rng.integers(1, 3))), replace=False)
        edits = [_edit(rng, pools.concepts[i]) for i in chosen]
        return _post(kind, {"user_id": user, "k": k, "steering": {"edits": edits}}, "steered")
    if kind == "explain":
        return _post(kind, {"user_id": user, "k": k, "explain": True}, "explained")
    if kind == "history":
        return _post(kind, {"history": pools.history(rng, min(20, config.max_history)), "k": k})
    raise ValueError(kind)


def _bad(kind: str, rng: np.random.Generator, pools: _Pools, config: ServiceConfig) -> Call:
    user = pools.user(rng)
    if kind == "unknown_user":
        return _post(kind, {"user_id": f"no-such-user-{int(rng.integers(10**6))}"}, valid=False)
    if kind == "bad_k":
        return _post(kind, {"user_id": user, "k": int(rng.choice([0, -3, config.max_k + 1]))}, valid=False)
    if kind == "malformed_json":
        text = json.dumps({"user_id": user, "k": 10})
        return Call(kind, False, "POST", PATH, text[: int(rng.integers(1, len(text) - 1))].encode(), None)
    if kind == "unknown_policy":
        return _post(kind, {"user_id": user, "steering": {"policy": "no-such-policy"}}, valid=False)
    if kind == "unknown_concept":
        edit = {"concept": "no-such-concept", "op": "ablate"}
        return _post(kind, {"user_id": user, "steering": {"edits": [edit]}}, valid=False)
    if kind == "edit_out_of_range":
        if rng.random() < 0.5 and pools.concepts:
            value = config.max_abs_std * 5
            edit = {"concept": pools.concepts[int(rng.integers(len(pools.concepts)))], "op": "nudge", "value": value,
                    "unit": "std"}  # fmt: skip
        else:
            edit = {"latent": pools.n_latents + int(rng.integers(100)), "op": "ablate"}
        return _post(kind, {"user_id": user, "steering": {"edits": [edit]}}, valid=False)
    if kind == "oversize_body":
        return _post(kind, {"user_id": user, "note": "x" * (config.max_body_bytes + 1)}, valid=False)
    if kind == "unknown_history_item":
        return _post(kind, {"history": ["no-such-item", *pools.history(rng, 5)]}, valid=False)
    if kind == "bad_query":
        return _get(kind, {"user_id": user, "colour": "red"}, valid=False)
    raise ValueError(kind)


def in_process_status(call: Call, served: Served, config: ServiceConfig) -> int:
    """The status the replica's request path gives `call` (200 when it would be served), computed here."""
    try:
        if call.body is not None and len(call.body) > config.max_body_bytes:
            return 413
        if call.method == "GET":
            request = query_request(QueryParams(call.path.partition("?")[2]), config)
        else:
            request = RecommendRequest.model_validate_json(call.body or b"", context={"config": config})
        served.requests.parse(request)
    except ValidationError:
        return 422
    except RequestError as err:
        return err.status
    return 200


def _applicable(kind: str, served: Served, pools: _Pools, config: ServiceConfig) -> str | None:
    """Why this bundle cannot take valid `kind` (None when it can)."""
    if kind == "policy" and not pools.policies:
        return "the bundle has no usable policy"
    if kind == "edit" and not pools.concepts:
        return "the bundle's catalog names no live latent"
    if kind == "history":
        probe = _valid(kind, np.random.default_rng(0), pools, config)
        if (status := in_process_status(probe, served, config)) != 200:
            return f"the bundle refuses histories ({status})"
    return None


def build_schedule(served: Served, config: ServiceConfig, bad_share: float, seed: int) -> Schedule:
    """SCHEDULE_LENGTH calls: each bad with probability `bad_share`, else a valid kind by weight. Raises
    GeneratorError if any call's in-process status contradicts its kind."""
    pools = _Pools(served)
    skipped = {k: why for k in VALID_KINDS if (why := _applicable(k, served, pools, config)) is not None}
    kinds = [k for k in VALID_KINDS if k not in skipped]
    weights = np.asarray([VALID_KINDS[k] for k in kinds], dtype=np.float64)
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(SCHEDULE_LENGTH):
        if rng.random() < bad_share:
            call = _bad(BAD_KINDS[int(rng.integers(len(BAD_KINDS)))], rng, pools, config)
        else:
            call = _valid(kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))], rng, pools, config)
        status = in_process_status(call, served, config)
        if (status == 200) != call.valid or not (call.valid or 400 <= status < 500):
            shown = (call.body or b"")[:200].decode(errors="replace") or call.path
            raise GeneratorError(f"soak traffic: a {call.kind!r} call gets {status} in process: {shown}")
        calls.append(call)
    return Schedule(calls, skipped)


def answer_problem(call: Call, status: int | None, answer: bytes) -> str | None:
    """Why an HTTP answer to `call` is wrong (None when it is as it must be): a valid call needs a 200 showing what
    `call.check` asks, a bad one a 4xx; `status` None is a transport error."""
    if status is None:
        return "no answer (transport error or timeout)"
    if not call.valid:
        return None if 400 <= status < 500 else f"bad input answered {status}"
    if status != 200:
        return f"answered {status}: {answer[:200].decode(errors='replace')}"
    try:
        body = json.loads(answer)
    except ValueError:
        return "200 whose body is not JSON"
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        return "200 without an items list"
    if call.check == "steered" and body.get("steering_applied") is not True:
        return f"steering not applied ({body.get('steering_suppressed') or 'steering_applied is not true'})"
    if call.check == "explained" and not isinstance(body.get("explanation"), dict):
        return "explain answered without an explanation"
    return None
