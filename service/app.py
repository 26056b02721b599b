"""The HTTP service: a FastAPI app served by a Ray Serve deployment that wraps one `Served` bundle.

    serve run service.app:app_builder bundle=/path/to/bundle          # or import_path: service.app:app in YAML

Handlers stay thin: service.requests parses, service.engine computes, service.responses shapes the JSON. Requests
are grouped by service.batching (each row keeps its own edits: a lone request runs at once, those that arrive while a
batch runs form the next); the engine runs in a worker thread so the event loop keeps accepting requests.
`reconfigure(user_config)` changes limits, batching and the bundle without a restart; a bundle that fails
verification is refused and the old one keeps serving.
"""

import asyncio
import hmac
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.deployment import Application

from recsae_core.common.errors import ArtifactError, ConfigError, RecsaeError
from service.batching import Batcher
from service.engine import Row, RowResult, limit_threads
from service.errors import RequestError
from service.ingress import BUNDLE_HEADER, BundleHeader, Ingress, Relayed, run_asgi, serving_bundle
from service.prometheus import ServiceMetrics, policy_label
from service.prometheus import current as current_metrics
from service.prometheus import register as register_metrics
from service.query import query_request
from service.rollout import RolloutError, rollout
from service.schemas import RecommendRequest, RecommendResponse, ServiceConfig, validation_message
from service.served import Served

log = logging.getLogger("recsae.service")
ADMIN_TOKEN_ENV = "RECSAE_ADMIN_TOKEN"
BUNDLE_ENV = "RECSAE_BUNDLE"
MAX_QUEUED_REQUESTS = 64
"""Default max_queued_requests of the ingress: requests waiting in the proxy beyond those it relays."""
RETRY_AFTER_S = 1.0
"""Default Retry-After (seconds) of the 503 that sheds a request over max_queued_requests."""
fastapi_app = FastAPI(title="recsae", description="SAE monitoring and steering in front of a recommender")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str | None = Field(None, min_length=1, description="bundle folder; default: reload the current one")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, "status": status}, status_code=status, headers=headers)


def server_timing(timings: dict[str, float]) -> str:
    """The Server-Timing header of an answer: stage durations in ms."""
    return ", ".join(f"{stage};dur={value:.3f}" for stage, value in timings.items())


@fastapi_app.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return error(err.status, err.message, headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in err.errors()]
    return error(422, "; ".join(parts))


@fastapi_app.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return error(500, f"internal error ({type(err).__name__}); see the replica log")


OUTCOMES = {401: "unauthorized", 403: "unauthorized", 404: "not_found", 409: "conflict", 413: "too_large"}


class MetricsMiddleware:
    """Counts every request by route template, method, outcome and policy, and times it (pure ASGI: cheap)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def record_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            metrics = current_metrics()
            if metrics is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                code = status[0]
                outcome = "ok" if code < 400 else OUTCOMES.get(code, "invalid" if code < 500 else "error")
                outcome = "invalid" if code in (400, 422) else outcome
                policy = scope.get("state", {}).get("policy", "none")
                metrics.request(route, scope["method"], outcome, policy, (time.perf_counter() - start) * 1000)


fastapi_app.add_middleware(MetricsMiddleware)
fastapi_app.add_middleware(BundleHeader)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) a declared or actual size over `limit` without reading past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="recsae", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(fastapi_app)
class RecsaeService:
    """One replica. The bundle comes in `user_config`: Ray calls reconfigure() right after __init__, before the
    replica takes traffic, so the first bundle is loaded and warmed up there (a bad one fails the replica's start).
    Init arguments stay fixed so that a new user_config is applied in place, never by a restart."""

    def __init__(self, max_ongoing_requests: int = 64) -> None:
        self.max_ongoing = max_ongoing_requests
        self.metrics = ServiceMetrics()
        self.config: ServiceConfig | None = None
        self.served: Served | None = None
        self.admin_token = os.environ.get(ADMIN_TOKEN_ENV) or None
        self.last_reload: dict[str, Any] = {}
        self.lock = asyncio.Lock()
        self.refresher: asyncio.Task | None = None
        self.batcher = Batcher(self._batched)
        register_metrics(self.metrics)

    async def _refresh_gauges(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.metrics.refresh()

    # ------------------------------------------------------------- configuration

    def _apply_batching(self) -> None:
        size = self.config.max_batch_size
        if size > self.max_ongoing:
            log.warning("max_batch_size %d > max_ongoing_requests %d: batches could never fill; using %d",
                        size, self.max_ongoing, self.max_ongoing)  # fmt: skip
            size = self.max_ongoing
        self.batcher.max_batch_size = size
        self.batcher.wait_s = self.config.batch_wait_timeout_s

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new user_config. A new bundle is loaded beside the old one and swapped in only once verified and
        warmed up; an invalid config or bundle is logged and refused, and the replica keeps serving what it had.
        Only the very first configuration raises (nothing to fall back to: the replica must not start)."""
        first = self.served is None
        if self.refresher is None:
            self.refresher = asyncio.get_running_loop().create_task(self._refresh_gauges())
        try:
            new = ServiceConfig.model_validate(user_config)
        except ValidationError as err:
            message = f"service config: {validation_message(err)}"
            self._refused(user_config.get("bundle") if isinstance(user_config, dict) else None, message)
            if first:
                raise ConfigError(message) from None
            log.error("reconfigure refused: %s", message)
            return
        try:
            await self.switch(new)
        except RecsaeError as err:
            if first:
                raise
            log.error("reconfigure refused, still serving %s: %s", self.config.bundle, err)

    def _refused(self, bundle: str | None, message: str) -> None:
        self.last_reload = {"outcome": "refused", "bundle": bundle, "error": message, "at": time.time()}
        self.metrics.reload("refused")

    async def switch(self, new: ServiceConfig) -> None:
        """Load `new.bundle` if it (or its expected version, or the engine settings) changed, then adopt `new`;
        raises RecsaeError and keeps everything as it was if the bundle fails to load or is not the expected one."""
        async with self.lock:
            old, served = self.config, self.served
            load_keys = ("bundle", "bundle_version", "threads", "max_abs_std", "max_scale", "max_edits")
            if old is None or any(getattr(new, k) != getattr(old, k) for k in load_keys):
                limit_threads(new.threads)  # process-wide: this process is one replica
                try:
                    served = await asyncio.to_thread(Served.load, new.bundle, new.threads, new.edit_bounds())
                    found = served.versions.get("bundle")
                    if new.bundle_version is not None and found != new.bundle_version:
                        raise ArtifactError(
                            f"{new.bundle}: bundle version {found} is not the {new.bundle_version} this config "
                            "expects (the folder changed after the rollout was decided)"
                        )  # fmt: skip
                except RecsaeError as err:
                    self._refused(new.bundle, str(err))
                    raise
                self.last_reload = {"outcome": "ok", "bundle": new.bundle, "at": time.time()}
                self.metrics.reload("ok")
                log.info("serving bundle %s (versions %s)", new.bundle, served.versions)
            windows = (new.concept_metric_cap, new.drift_window)
            changed = served is not self.served or old is None or windows != (old.concept_metric_cap, old.drift_window)
            self.served, self.config = served, new
            serving_bundle(str(served.versions.get("bundle")))
            if changed:
                self.metrics.use_bundle(served, *windows)
                self.metrics.steering_switch(new.steering)
            self._apply_batching()

    # ------------------------------------------------------------- recommend

    async def _batched(self, jobs: list[tuple[Served, Row, bool]]) -> list[tuple[RowResult, dict[str, float], float]]:
        """One engine call per (bundle, sae) group: normally the whole batch (a reload can split one). Each job gets
        its result, the stage timings of its group (ms, with the group's `metrics` time) and the batch's start."""
        started = time.perf_counter()
        out: list[Any] = [None] * len(jobs)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, (served, _, sae) in enumerate(jobs):
            groups.setdefault((id(served), sae), []).append(i)
        for (_, sae), indices in groups.items():
            served, rows = jobs[indices[0]][0], [jobs[i][1] for i in indices]
            results, timings = await asyncio.to_thread(served.engine.recommend, rows, sae)
            t0 = time.perf_counter()
            self.metrics.batch(served, rows, results, timings)
            timings = {**timings, "metrics": (time.perf_counter() - t0) * 1000}
            for i, result in zip(indices, results, strict=True):
                out[i] = (result, timings, started)
        return out

    async def _serve(self, request: Request, parsed: RecommendRequest) -> JSONResponse:
        served, cfg = self.served, self.config
        t0 = time.perf_counter()
        row = served.requests.parse(parsed, sae=cfg.sae, steering_enabled=cfg.steering)
        request.state.policy = policy_label(row)
        t1 = time.perf_counter()
        if cfg.batching:
            result, timings, started = await self.batcher((served, row, cfg.sae))
        else:
            started = t1
            results, timings = await asyncio.to_thread(served.engine.recommend, [row], cfg.sae)
            self.metrics.batch(served, [row], results, timings)
            result = results[0]
        t2 = time.perf_counter()
        payload = served.responses.recommend(row, result, cfg.explain_top)
        # queue: waiting for a batch to start; batch: from its start to this answer (worker thread hop, the whole
        # batch's engine and metrics). Beside the engine's own stages, they show where a request's time goes.
        ms = {"parse": t1 - t0, "queue": started - t1, "batch": t2 - started, "respond": time.perf_counter() - t2}
        stages = {**{k: v * 1000 for k, v in ms.items()}, **timings}
        headers = {"Server-Timing": server_timing(stages), BUNDLE_HEADER: str(served.versions.get("bundle"))}
        return JSONResponse(payload, headers=headers)

    @fastapi_app.post("/v1/recommend", responses={200: {"model": RecommendResponse}})
    async def recommend(self, request: Request) -> JSONResponse:
        """Body: {user_id | history, k, exclude_seen, steering: {policy, edits: [...]}, explain}."""
        body = await read_body(request, self.config.max_body_bytes)
        try:
            parsed = RecommendRequest.model_validate_json(body, context={"config": self.config})
        except ValidationError as err:
            raise RequestError(422, validation_message(err)) from None
        return await self._serve(request, parsed)

    @fastapi_app.get("/v1/recommend", responses={200: {"model": RecommendResponse}})
    async def recommend_get(self, request: Request) -> JSONResponse:
        """?user_id=&k=&exclude_seen=&policy=&ablate=a,b&steer=concept:value&explain= (steer = nudge in std units)."""
        return await self._serve(request, query_request(request.query_params, self.config))

    # ------------------------------------------------------------- catalogue

    @fastapi_app.get("/v1/concepts")
    async def concepts(self) -> dict[str, Any]:
        return self.served.responses.concepts()

    @fastapi_app.get("/v1/concepts/{name}")
    async def concept(self, name: str) -> dict[str, Any]:
        return self.served.responses.concept_detail(name)

    @fastapi_app.get("/v1/policies")
    async def policies(self) -> dict[str, Any]:
        return self.served.responses.policies()

    # ------------------------------------------------------------- operations

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        cfg = self.config
        body = {
            "status": "ready",
            "bundle": cfg.bundle,
            "versions": self.served.versions,
            "sae": cfg.sae,
            "batching": cfg.batching,
            "max_batch_size": cfg.max_batch_size,
            "last_reload": self.last_reload,
            "pid": os.getpid(),
            "config": cfg.model_dump(),
        }
        return JSONResponse(body)

    @fastapi_app.post("/admin/reload")
    async def admin_reload(self, request: Request) -> JSONResponse:
        """Roll a bundle (default: the current folder as it is now) out to every replica as a new user_config (bundle
        and version; service/rollout.py), once loaded here as a replica would: a bundle that would be refused never
        reaches the fleet (422). 200 once every replica runs it, 202 if that takes longer. Needs a Bearer token."""
        if self.admin_token is None:
            raise RequestError(404, "Not Found")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not token:
            raise RequestError(401, "missing 'Authorization: Bearer <token>' header")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.admin_token.encode()):
            raise RequestError(403, "invalid admin token")
        body = await read_body(request, self.config.max_body_bytes)
        try:
            reload = ReloadRequest.model_validate_json(body or b"{}")
        except ValidationError as err:
            raise RequestError(422, validation_message(err)) from None
        previous, cfg = self.served.versions, self.config
        target = reload.bundle or cfg.bundle
        try:
            staged = await asyncio.to_thread(Served.load, target, cfg.threads, cfg.edit_bounds())
        except RecsaeError as err:
            self._refused(target, str(err))
            message = f"bundle refused, every replica still serves {previous.get('bundle')}: {err}"
            raise RequestError(422, message) from None
        versions = staged.versions
        del staged  # only loaded to be checked; each replica loads its own
        context = serve.get_replica_context()
        changes = {"bundle": target, "bundle_version": versions.get("bundle")}
        try:
            done = await asyncio.to_thread(rollout, context.app_name, context.deployment, changes, cfg.model_dump())
        except RolloutError as err:
            raise RequestError(err.status, err.args[0]) from None
        answer = {
            "status": "rolled out" if done.done else "rolling out (see `serve status`)",
            "bundle": target,
            "versions": versions,
            "previous": previous,
            "replicas": done.replicas,
            "seconds": round(done.seconds, 3),
        }
        return JSONResponse(answer, status_code=200 if done.done else 202)

    async def forward(self, scope: dict[str, Any], body: bytes) -> Relayed:
        """One HTTP request relayed by the ingress (service/ingress.py), answered by this replica's FastAPI app as if
        it had come over HTTP (with its headers: BundleHeader names the bundle)."""
        return await run_asgi(self.app, scope, body)


def app_builder(args: dict[str, Any] | None = None) -> Application:
    """Build the application from `serve run service.app:app_builder bundle=...` arguments or a YAML `args:`
    block: ServiceConfig fields, plus the model deployment's num_replicas (alias replicas), num_cpus and
    max_ongoing_requests; max_queued_requests (-1: unbounded) and retry_after_s (the Retry-After of the 503 that
    sheds a request beyond them); relay (default true) and, with it, ingress_replicas. `bundle` defaults to
    $RECSAE_BUNDLE. With relay, HTTP enters through the Ingress deployment, which relays to the model deployment
    `recsae` and retries a request whose replica dies (service/ingress.py). relay=false lets the model deployment
    take HTTP itself: no retry and no relay hop, the fastest path under Ray's high-throughput mode (docs/deploy.md,
    "Latency and the relay", for what it gives up)."""
    args = dict(args or {})
    if "bundle" not in args and os.environ.get(BUNDLE_ENV):
        args["bundle"] = os.environ[BUNDLE_ENV]
    if "bundle" not in args:
        raise ConfigError(f"service needs a bundle: pass bundle=/path/to/bundle or set ${BUNDLE_ENV}")
    relay = args.pop("relay", True)
    if isinstance(relay, str) and relay.lower() in ("true", "false", "1", "0"):
        relay = relay.lower() in ("true", "1")
    if not isinstance(relay, bool):
        raise ConfigError(f"service needs relay true or false (got {relay!r})")
    try:
        replicas = int(args.pop("num_replicas", args.pop("replicas", 1)))
        cpus = float(args.pop("num_cpus", 1))
        ongoing = int(args.pop("max_ongoing_requests", 0))
        queued = int(args.pop("max_queued_requests", MAX_QUEUED_REQUESTS))
        retry_after = float(args.pop("retry_after_s", RETRY_AFTER_S))
        ingress_replicas = int(args.pop("ingress_replicas", 1))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"service deployment options: {err}") from None
    checks = ((replicas >= 1, f"num_replicas >= 1 (got {replicas})"), (cpus >= 0, f"num_cpus >= 0 (got {cpus})"),
              (ingress_replicas >= 1, f"ingress_replicas >= 1 (got {ingress_replicas})"),
              (queued >= 1 or queued == -1, f"max_queued_requests -1 (unbounded) or >= 1 (got {queued})"),
              (0 <= retry_after <= 3600, f"retry_after_s between 0 and 3600 seconds (got {retry_after})"))  # fmt: skip
    for ok, need in checks:
        if not ok:
            raise ConfigError(f"service needs {need}")
    args.setdefault("threads", max(1, int(cpus)))
    try:
        cfg = ServiceConfig.model_validate(args)
    except ValidationError as err:
        raise ConfigError(f"service config: {validation_message(err)}") from None
    ongoing = max(ongoing, 2 * cfg.max_batch_size, 16)
    backpressure = {"retry_after_s": retry_after}
    options: dict[str, Any] = {"num_replicas": replicas, "max_ongoing_requests": ongoing,
                               "user_config": cfg.model_dump(), "ray_actor_options": {"num_cpus": cpus}}  # fmt: skip
    if not relay:
        # The replica takes max_ongoing_requests at once, lets max_queued_requests more wait for a slot (behind
        # HAProxy: in the replica itself), and the rest are answered 503 + Retry-After before any user code.
        return RecsaeService.options(**options, max_queued_requests=queued, backpressure_config=backpressure).bind(
            ongoing
        )
    model = RecsaeService.options(**options).bind(ongoing)
    # Admission happens at the proxy, the cheapest place to refuse a request: each ingress replica relays at most
    # what the model replicas take at once (so nothing waits without bound at the model either), and beyond its
    # queue the proxy answers 503 itself. With autoscaling, set the ingress's max_ongoing_requests in the config to
    # max_replicas x max_ongoing_requests. (Not a max_queued_requests on the model: Ray counts a request as queued
    # while the ingress's handle assigns it, so a burst the replicas can take would be refused.)
    limits = {"max_ongoing_requests": replicas * ongoing, "max_queued_requests": queued}
    return Ingress.options(num_replicas=ingress_replicas, backpressure_config=backpressure, **limits).bind(
        model, retry_after
    )


app = app_builder
"""`import_path: service.app:app` with an `args:` block in a Serve config file works the same as app_builder."""
