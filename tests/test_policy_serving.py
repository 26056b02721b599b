"""Fitted policies (erase, calibrated, spectral, popsteer) served over HTTP by a real Ray Serve deployment on loopback,
from the test bundle bundled again with policies fit on its own data (tests/fitted_policies.py). Every expected
answer is computed here from the bundle's files: h from its ONNX model, the policy's arrays read from its JSON, the
formula of its kind written out in numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.engine import Row
from service.local import LocalService, free_port, start_local
from service.served import Served

pytestmark = pytest.mark.slow
USERS = (0, 7, 200)


@dataclass
class Live:
    service: LocalService
    client: httpx.Client
    ref: Served
    """The same bundle loaded here, for its ONNX session, item matrix, seen items and ids only."""

    def post(self, body: dict) -> httpx.Response:
        return self.client.post("/v1/recommend", json=body)

    def user(self, index: int) -> str:
        return str(self.ref.bundle.user_ids[index])

    def arrays(self, policy: str) -> dict[str, np.ndarray]:
        doc = json.loads((self.ref.bundle.folder / "policies" / f"{policy}.json").read_text())
        arrays = {k: np.asarray(v["data"], np.float32).reshape(v["shape"]) for k, v in doc["arrays"].items()}
        return {**arrays, "strength": doc["strength"]}


@pytest.fixture(scope="module")
def live(fitted_bundle: Path) -> Iterator[Live]:
    service = start_local(fitted_bundle, free_port(), free_port(), num_cpus=0.5, user_config={"max_batch_size": 8})
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            yield Live(service, client, Served.load(fitted_bundle))
    finally:
        service.stop()


def user_h(live: Live, user: int) -> np.ndarray:
    """(1, d) the user's h from the bundle's ONNX model on its stored inputs."""
    engine, bundle = live.ref.engine, live.ref.bundle
    feed = {name: bundle.user_inputs[name][[user]] for name in bundle.inputs.names}
    return engine.session.run([engine.output], feed)[0]


def top(live: Live, h: np.ndarray, seen: np.ndarray, k: int = 10) -> tuple[list[str], np.ndarray]:
    """The top-k item ids and scores of h E^T with the seen items masked (the model's own ranking of h)."""
    scores = (h @ live.ref.bundle.item_embeddings.T)[0]
    scores[seen] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [live.ref.responses.item_ids[i] for i in order], scores[order]


def served(response: httpx.Response) -> tuple[list[str], np.ndarray]:
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    return [i["item_id"] for i in items], np.array([i["score"] for i in items])


def assert_serves(response: httpx.Response, expected: tuple[list[str], np.ndarray]) -> None:
    ids, scores = served(response)
    assert ids == expected[0]
    np.testing.assert_allclose(scores, expected[1], atol=1e-4)


def test_requests_without_flags_are_the_original_model(live: Live) -> None:
    for user in USERS:
        response = live.post({"user_id": live.user(user), "k": 10})
        assert_serves(response, top(live, user_h(live, user), live.ref.bundle.seen(user)))
        assert response.json()["steering_applied"] is False and "original_rank" not in response.json()["items"][0]
        # bit for bit what the engine serves with the SAE switched off altogether
        (bare,), _ = live.ref.engine.recommend([Row(user=user)], sae=False)
        assert served(response)[0] == [live.ref.responses.item_ids[i] for i in bare.items]
        assert np.array_equal(served(response)[1], bare.scores.astype(np.float64))


def erased(live: Live, h: np.ndarray, t: float) -> np.ndarray:
    p = live.arrays("erase-gender")
    return h - t * ((h - p["anchor"]) @ p["b"].T) @ p["a"]


def test_erase_by_name_and_with_a_per_request_strength(live: Live) -> None:
    p = live.arrays("erase-gender")
    assert p["strength"] == 1.0
    changed = 0
    for user in USERS:
        h, seen = user_h(live, user), live.ref.bundle.seen(user)
        response = live.post({"user_id": live.user(user), "steering": {"policy": "erase-gender"}, "explain": True})
        assert_serves(response, top(live, erased(live, h, 1.0), seen))
        changed += top(live, erased(live, h, 1.0), seen)[0] != top(live, h, seen)[0]
        body = response.json()
        assert body["steering_applied"] and body["policy"] == "erase-gender"
        report = body["explanation"]["policy"]
        assert report["kind"] == "erase" and report["strength"] == 1.0 and report["multiplier"] == 1.0
        np.testing.assert_allclose(report["detail"]["coefficients"], ((h - p["anchor"]) @ p["b"].T)[0], rtol=1e-4)
        assert all("steered_activation" in latent for latent in body["explanation"]["latents"])
        half = {"user_id": live.user(user), "steering": {"policy": "erase-gender", "strength": 0.5}}
        assert_serves(live.post(half), top(live, erased(live, h, 0.5), seen))
        query = {"user_id": live.user(user), "policy": "erase-gender", "strength": "0.5"}
        assert_serves(live.client.get("/v1/recommend", params=query), top(live, erased(live, h, 0.5), seen))
        zero = live.post({"user_id": live.user(user), "steering": {"policy": "erase-gender", "strength": 0}})
        assert_serves(zero, top(live, h, seen))  # t = 0 leaves h as it was
    assert changed  # the test can see a wrong transform: erasing changes lists


def calibrated(live: Live, h: np.ndarray, seen: np.ndarray, t: float) -> tuple[np.ndarray, float]:
    """h - t g p with g = mean log(1 + pop) of the unsteered top-10 (seen masked) minus that of `seen`, at least 0."""
    p, popularity = live.arrays("calibrated-popularity"), live.ref.popularity
    listed, _ = top(live, h, seen)
    index = {item: i for i, item in enumerate(live.ref.responses.item_ids)}
    listed = np.array([index[item] for item in listed])
    gap = max(np.log1p(popularity[listed]).mean() - np.log1p(popularity[seen]).mean(), 0.0)
    return h - t * gap * p["direction"], gap


def test_calibrated_by_name_and_with_a_per_request_strength(live: Live) -> None:
    # Every user is looked at (a local computation): which users the policy moves depends on the trained model.
    users = range(len(live.ref.bundle.user_ids))
    gaps = {user: calibrated(live, user_h(live, user), live.ref.bundle.seen(user), 1.0)[1] for user in users}
    chosen = [u for u, gap in gaps.items() if gap > 0][:4] + [u for u, gap in gaps.items() if gap == 0][:1]
    assert len(chosen) == 5, gaps  # users the policy moves, and one it leaves alone
    changed = 0
    for user in chosen:
        h, seen = user_h(live, user), live.ref.bundle.seen(user)
        request = {"user_id": live.user(user), "steering": {"policy": "calibrated-popularity"}, "explain": True}
        response = live.post(request)
        steered, gap = calibrated(live, h, seen, 1.0)
        assert_serves(response, top(live, steered, seen))
        detail = response.json()["explanation"]["policy"]["detail"]
        assert detail["popularity_gap"] == pytest.approx(gap, rel=1e-4, abs=1e-6)
        double = {"user_id": live.user(user), "steering": {"policy": "calibrated-popularity", "strength": 2.0}}
        assert_serves(live.post(double), top(live, calibrated(live, h, seen, 2.0)[0], seen))
        changed += top(live, calibrated(live, h, seen, 2.0)[0], seen)[0] != top(live, h, seen)[0]
    assert changed
    history = [live.ref.responses.item_ids[i] for i in live.ref.bundle.seen(7)[:20]]
    as_history = live.post({"history": history, "steering": {"policy": "calibrated-popularity"}, "explain": True})
    assert as_history.status_code == 200, as_history.text
    assert as_history.json()["explanation"]["policy"]["detail"]["popularity_gap"] >= 0


def test_spectral_and_popsteer_are_served(live: Live) -> None:
    p = live.arrays("spectral-popularity")
    for user in USERS:
        h, seen = user_h(live, user), live.ref.bundle.seen(user)
        response = live.post({"user_id": live.user(user), "steering": {"policy": "spectral-popularity"}})
        assert_serves(response, top(live, h - p["strength"] * (h @ p["b"].T) @ p["a"], seen))
        response = live.post({"user_id": live.user(user), "steering": {"policy": "popsteer-popularity"}, "explain": 1})
        shifted = live.ref.engine.sae.shift_pre(h, live.arrays("popsteer-popularity")["shift"], 1.5)
        assert_serves(response, top(live, shifted.h, seen))
        detail = response.json()["explanation"]["policy"]["detail"]
        assert detail["entered"] == np.flatnonzero((shifted.z_new[0] > 0) & (shifted.z[0] <= 0)).tolist()


def test_an_edit_policy_takes_a_strength_too(live: Live) -> None:
    policy = next(p for p in live.client.get("/v1/policies").json()["policies"] if p["name"] == "tail-boost")
    (edit,) = policy["edits"]
    user = live.user(9)
    half = live.post({"user_id": user, "steering": {"policy": "tail-boost", "strength": 0.5}})
    explicit = {**edit, "value": edit["value"] / 2}
    explicit.pop("concept")
    assert_serves(half, served(live.post({"user_id": user, "steering": {"edits": [explicit]}})))


def test_listing_and_refusals(live: Live) -> None:
    policies = {p["name"]: p for p in live.client.get("/v1/policies").json()["policies"]}
    for name, kind in (("erase-gender", "erase"), ("calibrated-popularity", "calibrated"),
                       ("spectral-popularity", "spectral"), ("popsteer-popularity", "popsteer")):  # fmt: skip
        assert policies[name]["usable"] and policies[name]["kind"] == kind, policies[name]
    assert policies["tail-boost"]["kind"] == "edits"
    loads = policies["erase-gender"]["fit"]["directions"][0]
    assert loads["loads_on"][0]["latent"] >= 0 and 0 < loads["span_share"] <= 1
    assert not policies["erase-other-sae"]["usable"] and "made for sae 0000" in policies["erase-other-sae"]["error"]
    user = live.user(3)
    cases = [
        ({"policy": "erase-other-sae"}, "policy 'erase-other-sae' cannot be used with this bundle: made for sae 0000"),
        ({"policy": "erase-gender", "strength": 4.5}, "steering.strength: must be between 0 and 4 (got 4.5)"),
        ({"policy": "erase-gender", "strength": -0.1}, "steering.strength: must be between 0 and 4"),
        ({"strength": 0.5}, "'strength' scales a policy; give 'policy' too"),
        ({"policy": "erase-gendr"}, "did you mean 'erase-gender'"),
    ]
    for steering, needle in cases:
        response = live.post({"user_id": user, "steering": steering})
        assert response.status_code == 422 and needle in response.json()["detail"], response.text
    response = live.client.get("/v1/recommend", params={"user_id": user, "policy": "erase-gender", "strength": "x"})
    assert response.status_code == 422 and "strength: expected a number" in response.json()["detail"]


def test_concurrent_requests_of_mixed_policies_answer_as_alone(live: Live) -> None:
    bodies = [
        {"user_id": live.user(u), "k": 5, **({"steering": {"policy": p}} if p else {})}
        for u in (1, 2, 3, 4)
        for p in (None, "erase-gender", "calibrated-popularity", "popsteer-popularity")
    ]
    alone = [served(live.post(body)) for body in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda body: served(live.post(body)), bodies))
    for (ids, scores), (ids_alone, scores_alone) in zip(together, alone, strict=True):
        assert ids == ids_alone
        np.testing.assert_allclose(scores, scores_alone, atol=1e-5)


def test_the_engine_applies_each_policy_once_per_batch_as_row_by_row(live: Live) -> None:
    ref = live.ref
    policies = {name: ref.catalog.policy(name).fitted for name in ("erase-gender", "calibrated-popularity")}
    rows = [Row(user=u, transform=policies[name], strength=s, policy=name, explain=True)
            for u, name, s in ((0, "erase-gender", 1.0), (5, "calibrated-popularity", 0.5), (9, "erase-gender", 2.0),
                               (12, "calibrated-popularity", 1.0), (20, "erase-gender", 0.0))]  # fmt: skip
    rows.append(Row(user=30))
    batch, _ = ref.engine.recommend(rows)
    for row, result in zip(rows, batch, strict=True):
        (alone,), _ = ref.engine.recommend([row])
        np.testing.assert_array_equal(result.items, alone.items)
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-5)
        assert (result.policy_detail is None) == (row.transform is None)
