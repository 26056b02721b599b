"""The floor of `recsae bench serve`: the same bundle, loaded by the same `Served`, answered by the same request path
as a replica's handler (body limit, schema, parse, engine, response, Server-Timing), inline in a plain Starlette app
under uvicorn, in one process without Ray. No batching, no worker thread, no Prometheus: what is left is the engine
and the work any Python HTTP server does, so the bench can say what the serving stack costs on top of it.

    python -m service.floor --bundle BUNDLE --port 8123 [--config '{"sae": true}']

It runs in its own process so that it does not share a GIL with the load generator, as the deployment does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from recsae_core.common.errors import RecsaeError
from service.app import error, read_body, server_timing
from service.engine import limit_threads
from service.errors import RequestError
from service.local import free_port
from service.schemas import RecommendRequest, ServiceConfig, validation_message
from service.served import Served


def floor_app(served: Served, config: ServiceConfig) -> Starlette:
    """POST /v1/recommend as the deployment answers it without batching, the engine called inline; GET /readyz."""

    async def recommend(request: Request) -> Response:
        try:
            body = await read_body(request, config.max_body_bytes)
            try:
                parsed = RecommendRequest.model_validate_json(body, context={"config": config})
            except ValidationError as err:
                raise RequestError(422, validation_message(err)) from None
            row = served.requests.parse(parsed, sae=config.sae, steering_enabled=config.steering)
        except RequestError as err:
            return error(err.status, err.message)
        results, timings = served.engine.recommend([row], config.sae)
        payload = served.responses.recommend(row, results[0], config.explain_top)
        return JSONResponse(payload, headers={"Server-Timing": server_timing(timings)})

    async def readyz(_: Request) -> Response:
        return JSONResponse({"status": "ready", "pid": os.getpid(), "versions": served.versions})

    return Starlette(routes=[Route("/v1/recommend", recommend, methods=["POST"]), Route("/readyz", readyz)])


@dataclass
class FloorServer:
    """A floor server running in a child process; `stop()` ends it."""

    url: str
    process: subprocess.Popen
    log: Path
    """The child's stderr (read when it fails to start)."""

    @classmethod
    def start(cls, bundle: Path, user_config: dict[str, Any] | None = None, timeout_s: float = 180.0) -> FloorServer:
        """Start it on a free loopback port and wait until /readyz answers (or raise naming why not)."""
        port = free_port()
        log = Path(tempfile.mkstemp(prefix="recsae-floor-", suffix=".log")[1])
        command = [sys.executable, "-m", "service.floor", "--bundle", str(bundle), "--port", str(port)]
        command += ["--config", json.dumps(user_config or {})]
        with log.open("wb") as stderr:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        server = cls(f"http://127.0.0.1:{port}", process, log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1][:300]
                raise RecsaeError(f"the floor server exited with code {process.returncode}: {tail}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        server.stop()
        raise RecsaeError(f"the floor server did not answer /readyz within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m service.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--config", default="{}", help="ServiceConfig fields as JSON (the deployment's user_config)")
    args = parser.parse_args(argv)
    try:
        config = ServiceConfig.model_validate({"bundle": str(args.bundle), **json.loads(args.config)})
    except (ValueError, ValidationError) as err:
        print(f"floor: error: --config: {err}".splitlines()[0], file=sys.stderr)
        return 2
    limit_threads(config.threads)
    try:
        served = Served.load(config.bundle, config.threads, config.edit_bounds())
    except RecsaeError as err:
        print(f"floor: error: {err}", file=sys.stderr)
        return 2
    uvicorn.run(floor_app(served, config), host=args.host, port=args.port, log_level="warning", access_log=False,
                lifespan="off")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
