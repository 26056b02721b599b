"""The service as a fleet (issue 17): two model replicas on loopback, a bundle rolled out to both or to neither, a
replica killed under load without a failed request, and overload shed with 503 + Retry-After.

Nothing is mocked: the real bundle, local Ray, the app deployed from a Serve config as in production, HTTP load from
aiohttp clients (service/timeline.py), a replica process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest

from recsae_core.bundle.format import load_bundle
from service.app import ADMIN_TOKEN_ENV
from service.ingress import BUNDLE_HEADER
from service.local import LocalService, app_config, free_port, start_local
from service.reliability import (
    DIRECT,
    EXPORT_INTERVAL,
    RETRIES,
    Background,
    corrupt_bundle,
    replica_pids,
    variant_bundle,
    wait_for_replicas,
    wait_for_total,
)
from service.timeline import Outcome, closed_loop

pytestmark = pytest.mark.slow
TOKEN = "reliability-admin-token"
RETRY_AFTER_S = 2
QUEUED = 16


@dataclass
class Fleet:
    service: LocalService
    bundle: Path
    users: list[str]

    def bodies(self, n: int = 64) -> list[dict]:
        return [{"user_id": self.users[i % len(self.users)], "k": 5} for i in range(n)]


@pytest.fixture(scope="module")
def fleet(service_bundle: Path) -> Iterator[Fleet]:
    saved = {key: os.environ.get(key) for key in (ADMIN_TOKEN_ENV, EXPORT_INTERVAL)}
    os.environ.update({ADMIN_TOKEN_ENV: TOKEN, EXPORT_INTERVAL: "1000"})  # inherited by Ray's workers at ray.init
    limits = {"max_queued_requests": QUEUED, "retry_after_s": RETRY_AFTER_S}
    # Beside the fleet, the same service without the relay (relay=false: the model deployment takes HTTP itself).
    direct = app_config({"bundle": str(service_bundle), "num_replicas": 1, "num_cpus": 0.25, **limits},
                        {"bundle": str(service_bundle), "max_batch_size": 8}, name=DIRECT, route_prefix=f"/{DIRECT}",
                        import_path="service.reliability:direct_app")  # fmt: skip
    try:
        service = start_local(
            service_bundle, free_port(), free_port(), replicas=2, num_cpus=0.5,
            user_config={"max_batch_size": 8}, app_args=limits, extra_apps=[direct],
        )  # fmt: skip
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    try:
        users = [str(u) for u in load_bundle(service_bundle).user_ids[:50]]
        yield Fleet(service, service_bundle, users)
    finally:
        service.stop()


def every_replica(fleet: Fleet, tries: int = 200) -> dict[int, dict]:
    """/readyz of each model replica (by pid), asked until both have answered."""
    seen: dict[int, dict] = {}
    for _ in range(tries):
        ready = httpx.get(f"{fleet.service.url}/readyz", timeout=30).json()
        seen[ready["pid"]] = ready
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered /readyz in {tries} tries")


class Load:
    """Closed-loop clients in the background until stop(); times are seconds after `t0`."""

    def __init__(self, fleet: Fleet, concurrency: int, known: list[dict] | None = None) -> None:
        self.t0, self.halt = time.perf_counter(), threading.Event()
        bodies = fleet.bodies()
        self.loader = Background(lambda: closed_loop(fleet.service.url, bodies, concurrency, self.halt, self.t0, known))
        time.sleep(1.0)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def stop(self) -> list[Outcome]:
        self.halt.set()
        return self.loader.join()


def test_every_answer_names_its_bundle_with_or_without_the_relay(fleet: Fleet) -> None:
    version = load_bundle(fleet.bundle).manifest["versions"]["bundle"]
    user = fleet.users[0]
    for prefix in ("", f"/{DIRECT}"):
        for method, path, body in (("GET", "/readyz", None), ("GET", "/v1/policies", None),
                                   ("POST", "/v1/recommend", {"user_id": user, "k": 5}),
                                   ("POST", "/v1/recommend", {"user_id": user, "k": -1}),
                                   ("GET", "/no-such-route", None)):  # fmt: skip
            answer = httpx.request(method, fleet.service.url + prefix + path, json=body, timeout=30)
            assert answer.status_code in (200, 404, 422), (prefix, path, answer.text)
            assert answer.headers[BUNDLE_HEADER] == version, (prefix, path)
    # The direct app is the model deployment alone: no ingress deployment in front of it.
    from ray.serve.context import _get_global_client

    deployments = _get_global_client().get_serve_details()["applications"][DIRECT]["deployments"]
    assert set(deployments) == {"recsae"}


def test_a_rollout_reaches_every_replica_and_a_refused_bundle_none(fleet: Fleet, tmp_path: Path) -> None:
    old = load_bundle(fleet.bundle).manifest["versions"]
    new_folder = variant_bundle(fleet.bundle, tmp_path / "new")
    new = load_bundle(new_folder).manifest["versions"]
    bad = corrupt_bundle(fleet.bundle, tmp_path / "bad")
    assert new["bundle"] != old["bundle"] and new["model"] == old["model"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    admin = f"{fleet.service.url}/admin/reload"
    load = Load(fleet, 4, known=[old, new])
    try:
        rolled = httpx.post(admin, json={"bundle": str(new_folder)}, headers=auth, timeout=120)
        done_at = load.now()
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["versions"] == new and rolled.json()["replicas"] == 2
        replicas = every_replica(fleet)
        assert {r["versions"]["bundle"] for r in replicas.values()} == {new["bundle"]}
        for path in ("/v1/concepts", "/v1/no-such-route"):  # every answer names its bundle, errors too
            assert httpx.get(fleet.service.url + path, timeout=30).headers[BUNDLE_HEADER] == new["bundle"]

        refused = httpx.post(admin, json={"bundle": str(bad)}, headers=auth, timeout=120)
        assert refused.status_code == 422 and "model.onnx" in refused.json()["detail"], refused.text
        assert {r["versions"]["bundle"] for r in every_replica(fleet).values()} == {new["bundle"]}

        # The same bundle the Ray-native way (a Serve config with the new user_config, as `serve deploy`): each
        # replica refuses it, says so, and keeps serving what it had.
        fleet.service.update(bundle=str(bad), timeout_s=120)
        for ready in every_replica(fleet).values():
            assert ready["versions"]["bundle"] == new["bundle"], ready
            assert ready["last_reload"]["outcome"] == "refused" and "model.onnx" in ready["last_reload"]["error"]
    finally:
        outcomes = load.stop()
        fleet.service.update(bundle=str(fleet.bundle), timeout_s=120)
    assert outcomes and all(o.status == 200 for o in outcomes), {o.status for o in outcomes}
    assert all(o.consistent for o in outcomes)  # body versions are one bundle's, and the header's
    assert {o.bundle for o in outcomes} == {old["bundle"], new["bundle"]}
    late = [o for o in outcomes if o.start > done_at]  # sent after the rollout answered: the new bundle only
    assert late and all(o.bundle == new["bundle"] for o in late)


def test_a_killed_replica_loses_no_request(fleet: Fleet) -> None:
    """A SIGKILL under 16 clients fails no request. Whether any request is on the killed replica at that instant is
    chance (they may all be waiting in the proxy or the ingress: CI once missed three times in a row), so for this
    test each replica holds what it gets for a quarter of a second (batches larger than the clients, with a wait),
    which leaves it empty only while a finished batch's clients send again. The kill is still repeated, up to three
    times, until the ingress has counted a retry: the retry path itself must have been exercised."""
    holding = {"max_batch_size": 32, "batch_wait_timeout_s": 0.25}
    serving = httpx.get(f"{fleet.service.url}/readyz", timeout=30).json()["config"]
    fleet.service.update(**holding, timeout_s=120)
    try:
        killed_replica_and_a_retry(fleet)
    finally:  # the fleet's own settings back, for the tests after
        fleet.service.update(**{key: serving[key] for key in holding}, timeout_s=120)


def killed_replica_and_a_retry(fleet: Fleet) -> None:
    for attempt in range(3):
        before = replica_pids()
        assert len(before) == 2
        victim = min(before.values())
        load = Load(fleet, 16)  # most of them at the replicas, so some are in flight on the one killed
        try:
            killed_at = load.now()
            os.kill(victim, signal.SIGKILL)
            recovered = wait_for_replicas(2, {victim}, timeout_s=120)
            time.sleep(1.0)
        finally:
            outcomes = load.stop()
        assert recovered is not None, f"kill {attempt + 1}: the fleet did not get its second replica back"
        failed = [o for o in outcomes if o.status != 200]
        assert not failed, f"kill {attempt + 1}: {len(failed)} of {len(outcomes)} requests failed: " + str(
            sorted({o.status for o in failed})
        )
        assert sum(o.start < killed_at < o.end for o in outcomes) > 0  # requests were in flight at the kill
        assert any(o.start > killed_at for o in outcomes)
        # Those that were on the killed replica were sent again: the ingress counted them.
        if wait_for_total(fleet.service.metrics_url, RETRIES, 1, timeout_s=30) >= 1:
            return
    raise AssertionError("three kills under load, and the ingress never retried a request: none was ever on the "
                         "killed replica, or the retry path is not counted")  # fmt: skip


def test_overload_is_shed_with_503_and_retry_after(fleet: Fleet) -> None:
    async def burst(n: int) -> list[tuple[int, str | None, str]]:
        async with aiohttp.ClientSession(fleet.service.url, connector=aiohttp.TCPConnector(limit=n)) as session:

            async def one(body: dict) -> tuple[int, str | None, str]:
                async with session.post("/v1/recommend", json=body) as response:
                    return response.status, response.headers.get("retry-after"), await response.text()

            return await asyncio.gather(*(one(body) for body in fleet.bodies(n)))

    answers = asyncio.run(burst(400))  # far over 2 replicas x 16 ongoing + 16 queued
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    shed = [(retry, body) for status, retry, body in answers if status == 503]
    assert shed and statuses.count(200) >= 2 * 16
    # Shed by Ray Serve's proxy: the ingress relays 2 x 16 at once and 16 more wait.
    assert all(retry == str(RETRY_AFTER_S) and ("backpressure" in body) for retry, body in shed), shed[0]
    # The load is gone: the next requests are all answered.
    assert all(httpx.post(f"{fleet.service.url}/v1/recommend", json=b, timeout=30).status_code == 200
               for b in fleet.bodies(8))  # fmt: skip
