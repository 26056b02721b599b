"""Request/response models and the service configuration, with validation that names the exact problem.

Limits that an operator can change at run time (k, history length, edits per request, ...) live in `ServiceConfig`
and reach the request validators through pydantic's validation context (`context={"config": cfg}`), so one set of
models serves every configuration.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from recsae_core.sae.edits import OPS, UNITS, EditBounds, op_problem

Op = Literal[OPS]  # the names come from recsae_core's op table: a new op needs no change here
Unit = Literal[UNITS]
Id = Annotated[str | int, Field(union_mode="left_to_right")]


class ServiceConfig(BaseModel):
    """Everything `reconfigure` may change without a restart (the deployment's `user_config`)."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(min_length=1, description="bundle folder; changing it hot-swaps the model")
    bundle_version: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{16}$",
        description="expected versions.bundle of the bundle's manifest: a replica refuses a folder that holds another "
        "bundle (a rollout pins it, so a replica started later serves what the others do); changing it reloads",
    )
    max_k: int = Field(100, ge=1, le=10000, description="largest k a request may ask for")
    max_history: int = Field(200, ge=1, le=100000, description="most item ids in a request's history")
    max_body_bytes: int = Field(65536, ge=1024, le=16 << 20, description="larger request bodies get 413")
    max_edits: int = Field(32, ge=1, le=1024, description="most edits per request (policy edits included)")
    max_abs_std: float = Field(10.0, gt=0, le=1000, description="bound on |pin/nudge| in std units of a latent")
    max_scale: float = Field(10.0, gt=0, le=1000, description="bound on |scale| factors")
    max_policy_strength: float = Field(
        4.0, gt=0, le=1000, description="bound on a request's steering.strength (a multiplier of the policy's)"
    )
    explain_top: int = Field(8, ge=1, le=256, description="latents listed by explain")
    sae: bool = Field(True, description="false = bare mode: the SAE is skipped (no monitoring, steering, explain)")
    steering: bool = Field(
        True, description="false = kill switch: steering is ignored and every request gets the original ranking"
    )
    batching: bool = Field(True, description="group concurrent requests (service.batching)")
    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, le=1, description="extra wait for a batch that is not full (0: none; requests that arrive while a "
        "batch runs form the next one anyway)"
    )  # fmt: skip
    concept_metric_cap: int = Field(64, ge=0, le=256, description="concept label values exported (rest 'other')")
    drift_window: int = Field(2048, ge=16, le=1_000_000, description="requests in the live-statistics window")
    threads: int = Field(1, ge=1, le=256, description="ONNX Runtime / torch threads per replica")

    @field_validator("max_abs_std", "max_scale", "max_policy_strength", "batch_wait_timeout_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    def edit_bounds(self) -> EditBounds:
        """The limits every request's edits are validated against."""
        return EditBounds(max_abs_std=self.max_abs_std, max_scale=self.max_scale, max_edits=self.max_edits)


def _config(info: ValidationInfo) -> ServiceConfig | None:
    context = info.context or {}
    return context.get("config")


UNBOUNDED = EditBounds(max_abs_std=math.inf, max_scale=math.inf)
"""Without a ServiceConfig in the validation context, only the ops' own rules apply."""


class EditIn(BaseModel):
    """One latent edit, addressed by catalogued concept name or by latent index. Its op, value and unit are checked
    by recsae_core's edit rules (op_problem) as the request is parsed, so a bad edit is refused before any id is
    looked up; the rest (latent range, statistics, conflicts with a policy) once it is resolved."""

    model_config = ConfigDict(extra="forbid")

    concept: str | None = Field(None, min_length=1, max_length=200)
    latent: int | None = Field(None, ge=0, strict=True)
    op: Op
    value: float = Field(0.0, allow_inf_nan=False)
    unit: Unit = "raw"

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> EditIn:
        if (self.concept is None) == (self.latent is None):
            raise ValueError("give exactly one of 'concept' or 'latent'")
        cfg = _config(info)
        if problem := op_problem(self.op, self.value, self.unit, cfg.edit_bounds() if cfg is not None else UNBOUNDED):
            raise ValueError(problem)
        return self

    @property
    def target(self) -> str:
        return f"concept '{self.concept}'" if self.concept is not None else f"latent {self.latent}"


class Steering(BaseModel):
    """A named policy, explicit edits, or both (they may not touch the same latent); `strength` scales the policy."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = Field(None, min_length=1, max_length=200)
    edits: list[EditIn] = Field(default_factory=list)
    strength: float | None = Field(
        None,
        allow_inf_nan=False,
        description="multiplier of the policy's strength (1 = as fitted; 0 = no move): for edit policies it scales "
        "each edit's change of its latent, for fitted policies their t or alpha; in [0, max_policy_strength]",
    )

    @field_validator("strength")
    @classmethod
    def _strength(cls, strength: float | None, info: ValidationInfo) -> float | None:
        cfg = _config(info)
        bound = cfg.max_policy_strength if cfg is not None else math.inf
        if strength is not None and not 0 <= strength <= bound:
            raise ValueError(f"must be between 0 and {bound:g} (got {strength:g})")
        return strength

    @model_validator(mode="after")
    def _strength_needs_policy(self) -> Steering:
        if self.strength is not None and self.policy is None:
            raise ValueError("'strength' scales a policy; give 'policy' too")
        return self

    @field_validator("edits")
    @classmethod
    def _edits(cls, edits: list[EditIn], info: ValidationInfo) -> list[EditIn]:
        cfg = _config(info)
        if cfg is not None and len(edits) > cfg.max_edits:
            raise ValueError(f"{len(edits)} edits; at most {cfg.max_edits} are allowed")
        first: dict[tuple[str, Any], int] = {}
        for i, edit in enumerate(edits):
            key = ("concept", edit.concept.casefold()) if edit.concept is not None else ("latent", edit.latent)
            if key in first:
                raise ValueError(f"edits {first[key]} and {i} both target {edit.target}; one edit per latent")
            first[key] = i
        return edits

    @property
    def empty(self) -> bool:
        return self.policy is None and not self.edits


class RecommendRequest(BaseModel):
    """POST /v1/recommend."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id | None = Field(None, description="a known user (raw id as in the dataset)")
    history: list[Id] | None = Field(None, description="item ids, oldest first, for a user the bundle does not know")
    k: int = Field(10, ge=1, strict=True)
    exclude_seen: bool = True
    steering: Steering | None = None
    explain: bool = False

    @field_validator("k")
    @classmethod
    def _k(cls, k: int, info: ValidationInfo) -> int:
        cfg = _config(info)
        if cfg is not None and k > cfg.max_k:
            raise ValueError(f"must be between 1 and {cfg.max_k} (got {k})")
        return k

    @field_validator("history")
    @classmethod
    def _history(cls, history: list[str | int] | None, info: ValidationInfo) -> list[str | int] | None:
        if history is None:
            return None
        if not history:
            raise ValueError("must list at least one item id")
        cfg = _config(info)
        if cfg is not None and len(history) > cfg.max_history:
            raise ValueError(f"{len(history)} items; at most {cfg.max_history} are allowed")
        return history

    @model_validator(mode="after")
    def _one_subject(self) -> RecommendRequest:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of 'user_id' or 'history'")
        return self


class Item(BaseModel):
    item_id: str
    title: str
    score: float
    rank: int
    original_rank: int | None = Field(None, description="rank without steering (only when steering applied)")


class LatentReport(BaseModel):
    latent: int
    concept: str | None
    activation: float
    level: int = Field(description="RecSAE activation level 1..10 (global deciles of the training activations)")
    steered_activation: float | None = None


class AppliedEdit(BaseModel):
    latent: int
    concept: str | None
    op: Op
    value: float
    unit: Unit
    before: float
    after: float


class PolicyReport(BaseModel):
    name: str
    kind: str = Field(description="'edits' or an op name for edit policies; erase, spectral, calibrated, popsteer")
    strength: float = Field(description="the strength applied: the policy's x the request's multiplier")
    multiplier: float = Field(description="the request's steering.strength (1 when not given)")
    detail: dict[str, Any] = Field(default_factory=dict, description="this row's numbers behind the move")


class Explanation(BaseModel):
    latents: list[LatentReport]
    edits: list[AppliedEdit]
    l0: int
    fvu: float
    policy: PolicyReport | None = None


class RecommendResponse(BaseModel):
    items: list[Item]
    steering_applied: bool
    policy: str | None = None
    explanation: Explanation | None = None
    versions: dict[str, str | None]


def validation_message(err: ValidationError) -> str:
    """One line per problem: 'steering.edits[0].op: Input should be ...', without pydantic's URLs."""
    parts = []
    for problem in err.errors(include_url=False):
        where = ""
        for piece in problem["loc"]:
            where += f"[{piece}]" if isinstance(piece, int) else (f".{piece}" if where else str(piece))
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        elif problem["type"] == "json_invalid":
            message = f"request body is not valid JSON ({problem.get('ctx', {}).get('error', 'parse error')})"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
