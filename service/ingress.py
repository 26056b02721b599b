"""The HTTP entry of the application: a thin deployment that relays each request to a model replica (RecsaeService)
through a DeploymentHandle, and sends it once more, to another replica, if the one holding it dies.

Why a relay: Ray Serve's HTTP proxy answers 500 when the replica that accepted a request dies before answering; its
router re-routes only requests that no replica has accepted yet. A DeploymentHandle call raises RayActorError instead,
so the caller can decide. Every route of the service is a read (recommendations, listings, status) or idempotent (a
rollout to a bundle already rolled out changes nothing), so one retry is safe. The ingress holds no bundle and does no
model work; the model replica runs the request through its own FastAPI app (`run_asgi`), so routing, validation,
error messages and metrics are exactly those of a direct HTTP call.

Overload is refused before the relay: each ingress replica takes at most what the model replicas take at once
(its `max_ongoing_requests`), at most `max_queued_requests` more wait in Ray Serve's proxy, and the proxy answers the
rest 503 with `Retry-After` (`backpressure_config`) itself (service.app:app_builder sets these). Should the model
deployment be given a `max_queued_requests` of its own, its BackPressureError is answered the same way here.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, NamedTuple

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger("recsae.service")
BODY_LIMIT = 16 << 20
"""The largest body any ServiceConfig allows (max_body_bytes' upper bound); the model replica applies the real one."""
SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string", "headers",
              "client", "server")  # fmt: skip
"""The parts of an HTTP request's ASGI scope that are relayed (plain data; the rest is per-connection state)."""
BUNDLE_HEADER = "x-recsae-bundle"
"""Response header: `versions.bundle` of the bundle that served the request (every response of a model replica)."""


_SERVING: dict[str, str | None] = {"version": None}
"""`versions.bundle` of the bundle this process (one replica) serves now."""


def serving_bundle(version: str) -> None:
    """Record the bundle this replica serves now (RecsaeService.switch). A function here, not a global of
    service.app: Ray pickles the deployment class by value, with copies of the globals its methods use."""
    _SERVING["version"] = version


class BundleHeader:
    """Names the bundle that served the request on every answer (`X-Recsae-Bundle`), relayed or not; a
    recommendation sets its own (the bundle its batch ran on, which a reload may have replaced since)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_header(message: dict) -> None:
            version = _SERVING["version"]
            if message["type"] == "http.response.start" and version is not None:
                headers = list(message.get("headers", []))
                if not any(name.lower() == BUNDLE_HEADER.encode() for name, _ in headers):
                    message = {**message, "headers": [*headers, (BUNDLE_HEADER.encode(), version.encode())]}
            await send(message)

        await self.app(scope, receive, add_header)


class Relayed(NamedTuple):
    """One HTTP answer, as the model replica produced it."""

    status: int
    """HTTP status."""
    headers: list[tuple[bytes, bytes]]
    """Raw response headers, in order."""
    body: bytes
    """The whole body."""


async def run_asgi(app: Any, scope: dict[str, Any], body: bytes) -> Relayed:
    """Run one request through an ASGI app in this process and collect its answer."""
    done = asyncio.Event()
    delivered = False
    status, headers, chunks = 500, [], []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # as a connected client: nothing more until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app({**scope, "state": {}}, receive, send)
    finally:
        done.set()
    return Relayed(status, headers, b"".join(chunks))


def _answer(relayed: Relayed) -> Response:
    response = Response(relayed.body, status_code=relayed.status)
    response.raw_headers = relayed.headers
    return response


def unavailable(message: str, retry_after_s: float | None) -> JSONResponse:
    """503 in the service's error shape, with Retry-After (whole seconds, rounded up) when known."""
    headers = {"Retry-After": str(max(0, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse({"detail": message, "status": 503}, status_code=503, headers=headers)


@serve.deployment(name="ingress", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class Ingress:
    """Relays HTTP to the model deployment; one retry on a replica lost mid-request."""

    def __init__(self, model: DeploymentHandle, retry_after_s: float | None = 1.0) -> None:
        self.model = model
        self.retry_after_s = retry_after_s
        self.retries = Counter("recsae_ingress_retries", "Requests sent again after their replica was lost")

    async def __call__(self, request: Request) -> Response:
        body, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > BODY_LIMIT:
                return JSONResponse({"detail": f"request body exceeds {BODY_LIMIT} bytes", "status": 413}, 413)
            body.append(chunk)
        scope = {key: request.scope[key] for key in SCOPE_KEYS if key in request.scope}
        payload = b"".join(body)
        for attempt in (1, 2):
            try:
                return _answer(await self.model.forward.remote(scope, payload))
            except BackPressureError as err:
                return unavailable(f"overloaded: {err.message}", err.retry_after_s)
            except DeploymentUnavailableError as err:
                return unavailable(err.message, self.retry_after_s)
            except RayActorError as err:
                # The replica died (or became unreachable) with the request in flight: the router has already
                # dropped it, so the retry goes to another one.
                log.warning("%s %s: replica lost on attempt %d (%s)", scope["method"], scope["path"], attempt,
                            type(err).__name__)  # fmt: skip
                if attempt == 1:
                    self.retries.inc()
        return unavailable("the replicas serving this request were lost twice; retry", self.retry_after_s)
