"""Load that records every request (when it started and ended, its status, the bundle that answered it), for the
reliability scenarios (service/reliability.py), which need to know what happened when, not only the totals that
`recsae bench serve`'s closed loop keeps (service/bench_load.py).

Two shapes: a closed loop (`concurrency` clients, each sending its next request when the last is answered; until
`stop` is set or `duration` ends) and an open loop (requests sent at a fixed rate whatever the answers, as a
crowd of independent users does; the only way to offer more load than the service takes).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, NamedTuple

import aiohttp
import numpy as np

from service.ingress import BUNDLE_HEADER

PATH = "/v1/recommend"
TIMEOUT_S = 30.0
"""A request unanswered after this long counts as failed (status 0)."""


class Outcome(NamedTuple):
    """One request as the client saw it."""

    start: float
    """When it was sent, seconds after the scenario's t0."""
    end: float
    """When its answer had been read (or it failed), seconds after t0."""
    status: int
    """HTTP status; 0 for a transport error or timeout."""
    bundle: str | None
    """The answer's bundle version header."""
    retry_after: str | None
    """The answer's Retry-After header."""
    consistent: bool = True
    """With known versions: the body's `versions` are exactly one known bundle's and match the header."""

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile rounded to 0.1 ms; NaN for no values."""
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def _session(url: str, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        url,
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
        headers={"content-type": "application/json"},
    )


async def _send(
    session: aiohttp.ClientSession, payload: bytes, t0: float, known: list[dict] | None, path: str = PATH
) -> Outcome:
    start = time.perf_counter() - t0
    bundle = retry_after = None
    consistent = True
    try:
        async with session.post(path, data=payload) as response:
            body = await response.read()
            status = response.status
            bundle, retry_after = response.headers.get(BUNDLE_HEADER), response.headers.get("retry-after")
    except (TimeoutError, aiohttp.ClientError):
        status = 0
    end = time.perf_counter() - t0
    if known is not None and status == 200:
        versions = json.loads(body).get("versions")
        consistent = versions in known and versions.get("bundle") == bundle
    return Outcome(start, end, status, bundle, retry_after, consistent)


async def closed_loop(
    url: str,
    bodies: list[dict],
    concurrency: int,
    stop: threading.Event | None,
    t0: float,
    known: list[dict] | None = None,
    duration: float | None = None,
    path: str = PATH,
) -> list[Outcome]:
    """`concurrency` keep-alive clients posting to `path` back to back until `stop` is set (or `duration` seconds
    passed)."""
    payloads = [json.dumps(b).encode() for b in bodies]
    outcomes: list[Outcome] = []
    until = time.perf_counter() + duration if duration is not None else float("inf")

    def running() -> bool:
        return not (stop is not None and stop.is_set()) and time.perf_counter() < until

    async with _session(url, concurrency) as session:

        async def worker(i: int) -> None:
            while running():
                outcomes.append(await _send(session, payloads[i % len(payloads)], t0, known, path))
                i += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sorted(outcomes)


async def open_loop(
    url: str, bodies: list[dict], rate: float, duration: float, t0: float, connections: int = 1024
) -> list[Outcome]:
    """Requests sent at `rate` per second for `duration` seconds, each on its own, whatever the answers."""
    payloads = [json.dumps(b).encode() for b in bodies]
    tasks: list[asyncio.Task[Any]] = []
    async with _session(url, connections) as session:
        begin = time.perf_counter()
        for i in range(int(rate * duration)):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(session, payloads[i % len(payloads)], t0, None)))
        return sorted(await asyncio.gather(*tasks))
