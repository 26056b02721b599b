"""What each mode of `recsae bench serve` sends, and the check that steer mode measured steering.

Modes, all through the same HTTP path, batching and engine:
  bare     the deployment runs with sae=false: ONNX model + ranking only (the original recommender served alone)
  monitor  SAE on every request (encode + reconstruction error for monitoring), no edits: same items as bare
  steer    SAE on, and every request carries the same steering: `--policy` and/or `--edits`, else default_steering.
           Every answer in steer mode must report `steering_applied: true`, or the bench fails: a deployment with the
           kill switch on answers 200 without steering, and would otherwise be timed as "steered".

The steering is validated by the service's own request path (schema, catalog, edit rules) before Ray starts, and
recorded in the report as `steer`.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import numpy as np
from pydantic import ValidationError

from recsae_core.common.errors import ConfigError, RecsaeError
from recsae_core.sae.edits import Edit
from service.errors import RequestError
from service.schemas import RecommendRequest, ServiceConfig, validation_message
from service.served import Served

MODES = ("bare", "monitor", "steer")
DEFAULT_POLICY = "popularity"
"""The policy steer mode uses when given neither --policy nor --edits (the one docs/benchmarks.md measured)."""


class SteeringNotApplied(RecsaeError):
    """A steer-mode answer did not report `steering_applied: true`: the figures would not measure steering."""


class SteerPlan(NamedTuple):
    """What every steer-mode request sends, and what it resolves to."""

    steering: dict[str, Any]
    """The request's `steering` object, as sent over HTTP: `policy` and/or `edits`."""
    chosen_by: str
    """'options' (--policy/--edits), or 'default: ...' naming the rule that picked it."""
    edits: list[Edit]
    """The latent edits the service resolves it to (policy edits first)."""

    def record(self, served: Served) -> dict[str, Any]:
        """The report's `steer` entry."""
        return {
            "policy": self.steering.get("policy"),
            "edits": self.steering.get("edits", []),
            "chosen_by": self.chosen_by,
            "resolved_edits": [served.responses.edit_summary(e) for e in self.edits],
        }


def default_steering(served: Served) -> tuple[dict[str, Any], str]:
    """Without options: the bundle's `popularity` policy if usable, else its first usable policy in name order,
    else two edits (ablate the most frequent latent, nudge the second by +1 std). Name order, not the bundle's file
    order, so that adding a policy (a gender one, say) never changes what an existing bundle is benchmarked with."""
    usable = sorted(name for name, policy in served.catalog.policies.items() if policy.error is None)
    if DEFAULT_POLICY in usable:
        return {"policy": DEFAULT_POLICY}, f"default: the policy named '{DEFAULT_POLICY}'"
    if usable:
        return {"policy": usable[0]}, f"default: no usable '{DEFAULT_POLICY}' policy; the first usable one by name"
    order = np.argsort(-served.engine.sae.stats.frequency.numpy(), kind="stable")
    edits = [{"latent": int(order[0]), "op": "ablate"},
             {"latent": int(order[1]), "op": "nudge", "value": 1.0, "unit": "std"}]  # fmt: skip
    return {"edits": edits}, "default: no usable policy; two edits on the most frequent latents"


def plan_steering(
    served: Served, config: ServiceConfig, policy: str | None = None, edits: list[Any] | None = None
) -> SteerPlan:
    """The steering of steer mode: `policy` and/or `edits` (as the HTTP API takes them), else `default_steering`.
    It is validated by the path every request takes (schema, then the catalog and recsae_core's edit rules), so
    what is accepted here is exactly what the service accepts; a refusal is a ConfigError naming the problem."""
    if policy is None and edits is None:
        steering, chosen_by = default_steering(served)
    else:
        steering = {"policy": policy} if policy is not None else {}
        if edits is not None:
            steering["edits"] = edits
        chosen_by = "options"
    shown = json.dumps(steering, separators=(", ", ": "))
    body = {"user_id": str(served.bundle.user_ids[0]), "steering": steering}
    try:
        request = RecommendRequest.model_validate(body, context={"config": config})
        row = served.requests.parse(request)
    except ValidationError as err:
        raise ConfigError(f"steering {shown}: {validation_message(err)}") from None
    except RequestError as err:
        raise ConfigError(f"steering {shown}: {err.message}") from None
    if not row.edits:
        raise ConfigError(f"steering {shown}: no edits to apply; steer mode needs a policy or at least one edit")
    return SteerPlan(steering, chosen_by, row.edits)


def parse_edits(text: str) -> list[Any]:
    """--edits: a JSON list. Only its syntax is checked here; the edits themselves by plan_steering, as a request's."""
    try:
        edits = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--edits is not valid JSON: {err.msg} at column {err.colno} of {text!r}") from None
    if not isinstance(edits, list):
        # Checked here because None would read as "no --edits" and quietly fall back to the default steering.
        raise ConfigError(f"--edits takes a JSON list of edits ('[{{...}}, ...]'), got {text!r}")
    return edits


def steering_reported(answer: bytes | dict[str, Any]) -> tuple[bool, str | None]:
    """Whether an answer reports `steering_applied: true`, and if not, what it says instead."""
    try:
        body = json.loads(answer) if isinstance(answer, bytes) else answer
    except ValueError:
        return False, "the answer is not JSON"
    if not isinstance(body, dict) or "steering_applied" not in body:
        return False, "the answer has no steering_applied field"
    if body["steering_applied"] is True:
        return True, None
    return False, str(body.get("steering_suppressed") or f"steering_applied is {json.dumps(body['steering_applied'])}")


def check_steered(checked: int, steered: int, note: str | None, where: str, plan: SteerPlan) -> None:
    """Raise SteeringNotApplied unless every one of `checked` (> 0) steer-mode answers was steered."""
    if checked and steered == checked:
        return
    shown = json.dumps(plan.steering, separators=(", ", ": "))
    if not checked:
        raise SteeringNotApplied(f"{where}: no successful answer to check steering {shown} on")
    raise SteeringNotApplied(
        f"{where}: {checked - steered} of {checked} answers to steering {shown} did not report "
        f"steering_applied: true ({note}); the figures would not measure steering"
    )


def bodies(served: Served, mode: str, plan: SteerPlan, n: int = 512, seed: int = 0) -> list[dict]:
    """`n` request bodies of `mode` (steer: with the plan's steering), users drawn with `seed`."""
    rng = np.random.default_rng(seed)
    users = rng.choice(served.bundle.user_ids, size=n)
    steering = plan.steering if mode == "steer" else None
    return [{"user_id": str(u), "k": 10, **({"steering": steering} if steering else {})} for u in users]
