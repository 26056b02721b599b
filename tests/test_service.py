"""The HTTP service against a real Ray Serve deployment on loopback, started once for this module.

Nothing is mocked: a real bundle (SASRec on ML-100K + TopK SAE, see bundle_fixture), a local Ray with its metrics
agent on a fixed port, the app deployed through a Serve config exactly as in production, requests over httpx.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import ADMIN_TOKEN_ENV
from service.local import LocalService, app_config, free_port, start_local
from service.served import Served

pytestmark = pytest.mark.slow
TOKEN = "test-admin-token"
CAP = 8
RAY_EXPORT_INTERVAL = "RAY_metrics_report_interval_ms"  # read by Ray at start; default 10 s


@dataclass
class Live:
    service: LocalService
    client: httpx.Client
    bundle: Path
    ref: Served
    """The same bundle loaded here, used only for its ONNX session, SAE weights, statistics, catalog and ids."""

    def post(self, body: dict, path: str = "/v1/recommend") -> httpx.Response:
        return self.client.post(path, json=body)

    def user(self, index: int) -> str:
        return str(self.ref.bundle.user_ids[index])


@pytest.fixture(scope="module")
def live(service_bundle: Path) -> Iterator[Live]:
    saved = {k: os.environ.get(k) for k in (ADMIN_TOKEN_ENV, RAY_EXPORT_INTERVAL)}
    os.environ[ADMIN_TOKEN_ENV] = TOKEN  # inherited by Ray's workers at ray.init
    os.environ[RAY_EXPORT_INTERVAL] = "1000"
    no_admin = app_config(
        {"bundle": str(service_bundle), "num_cpus": 0.25},
        {"bundle": str(service_bundle)},
        name="noadmin",
        route_prefix="/noadmin",
        runtime_env={"env_vars": {ADMIN_TOKEN_ENV: ""}},
    )
    settings = {"concept_metric_cap": CAP, "max_body_bytes": 4096, "max_history": 60, "max_batch_size": 8}
    try:
        service = start_local(
            service_bundle, free_port(), free_port(), num_cpus=0.5, user_config=settings, extra_apps=[no_admin]
        )
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            yield Live(service, client, service_bundle, Served.load(service_bundle))
    finally:
        service.stop()


def reference(live: Live, user: int | None = None, history: list[int] | None = None) -> np.ndarray:
    """The original model alone, computed here: ONNX h, dot product with the item matrix, known items masked."""
    spec, bundle = live.ref.bundle.inputs, live.ref.bundle
    if user is not None:
        seq, seen = bundle.user_inputs[spec.history_input][[user]], bundle.seen(user)
    else:
        seq = np.full((1, spec.max_len), spec.pad_id, dtype=np.int64)
        seq[0, -len(history) :] = history
        seen = np.asarray(history)
    h = live.ref.engine.session.run(None, {spec.history_input: seq})[0]
    scores = (h @ bundle.item_embeddings.T)[0]
    scores[seen] = -np.inf
    return scores


def scores_by_item(response: httpx.Response) -> dict[str, float]:
    return {item["item_id"]: item["score"] for item in response.json()["items"]}


def direction(live: Live, latent: int) -> dict[str, float]:
    """<W_dec[latent], e_i> for every item: how much one unit of the latent moves each item's score."""
    values = live.ref.engine.sae.w_dec[latent] @ live.ref.bundle.item_embeddings.T
    return dict(zip(live.ref.responses.item_ids, values.tolist(), strict=True))


def test_passthrough_equals_the_original_model(live: Live) -> None:
    ids = np.asarray(live.ref.responses.item_ids)
    for user in (0, 7, 200):
        response = live.post({"user_id": live.user(user), "k": 10})
        assert response.status_code == 200, response.text
        body = response.json()
        expected = reference(live, user=user)
        order = np.argsort(-expected, kind="stable")[:10]
        assert [i["item_id"] for i in body["items"]] == ids[order].tolist()
        np.testing.assert_allclose([i["score"] for i in body["items"]], expected[order], atol=1e-5)
        assert body["steering_applied"] is False and all("original_rank" not in i for i in body["items"])
        assert body["versions"] == live.ref.bundle.manifest["versions"]
        assert "sae;dur=" in response.headers["server-timing"]
        same = live.client.get("/v1/recommend", params={"user_id": live.user(user), "k": 10}).json()
        assert [i["item_id"] for i in same["items"]] == ids[order].tolist()
    history = [3, 17, 42, 99]
    body = live.post({"history": [live.ref.responses.item_ids[i] for i in history], "k": 10}).json()
    expected = reference(live, history=history)
    order = np.argsort(-expected, kind="stable")[:10]
    assert [i["item_id"] for i in body["items"]] == ids[order].tolist()
    np.testing.assert_allclose([i["score"] for i in body["items"]], expected[order], atol=1e-5)


def test_ablating_the_most_active_latent(live: Live) -> None:
    base = live.post({"user_id": live.user(11), "k": 30, "exclude_seen": False, "explain": True}).json()
    top = base["explanation"]["latents"][0]
    steered = live.post(
        {
            "user_id": live.user(11),
            "k": 30,
            "exclude_seen": False,
            "explain": True,
            "steering": {"edits": [{"latent": top["latent"], "op": "ablate"}]},
        }
    )
    assert steered.status_code == 200, steered.text
    body = steered.json()
    assert body["steering_applied"] is True
    assert body["explanation"]["edits"][0]["before"] == pytest.approx(top["activation"])
    assert body["explanation"]["edits"][0]["after"] == 0
    before, after, move = scores_by_item_json(base), scores_by_item(steered), direction(live, top["latent"])
    common = set(before) & set(after)
    assert common and before != after
    for item in common:  # h' = h - z_j W_dec[j]: each score moves by -z_j <W_dec[j], e_i>
        assert after[item] - before[item] == pytest.approx(-top["activation"] * move[item], abs=1e-4)
    original = {i["item_id"]: i["rank"] for i in base["items"]}
    for item in body["items"]:  # unsteered rank: as served without steering, or beyond the 30 served then
        assert (
            item["original_rank"] == original[item["item_id"]]
            if item["item_id"] in original
            else (item["original_rank"] > 30)
        )
    assert any(i["rank"] != i["original_rank"] for i in body["items"])


def scores_by_item_json(body: dict) -> dict[str, float]:
    return {item["item_id"]: item["score"] for item in body["items"]}


def test_nudging_raises_items_aligned_with_the_latent(live: Live) -> None:
    stats = live.ref.engine.sae.stats
    latent = int(np.argmax(stats.std_activation.numpy()))
    std = float(stats.std_activation[latent])
    request = {"user_id": live.user(21), "k": 20, "exclude_seen": False}
    base = live.post(request)
    nudged = live.post(
        {**request, "steering": {"edits": [{"latent": latent, "op": "nudge", "value": 3, "unit": "std"}]}}
    )
    assert nudged.status_code == 200, nudged.text
    move = direction(live, latent)
    assert np.mean([move[i] for i in scores_by_item(nudged)]) > np.mean([move[i] for i in scores_by_item(base)])
    before, after = scores_by_item(base), scores_by_item(nudged)
    for item in set(before) & set(after):
        assert after[item] - before[item] == pytest.approx(3 * std * move[item], abs=1e-4)


def test_pin_to_current_value_and_scale(live: Live) -> None:
    request = {"user_id": live.user(30), "k": 15, "exclude_seen": False}
    base = live.post({**request, "explain": True}).json()
    # The strongest latent that a pin to its own value may name: one far in its tail (> max_abs_std std) is refused.
    std = live.ref.engine.sae.stats.std_activation.numpy()
    top = next(entry for entry in base["explanation"]["latents"] if entry["activation"] / std[entry["latent"]] < 10)
    pinned = live.post(
        {**request, "steering": {"edits": [{"latent": top["latent"], "op": "pin", "value": top["activation"]}]}}
    ).json()
    assert pinned["steering_applied"] is True
    assert [i["item_id"] for i in pinned["items"]] == [i["item_id"] for i in base["items"]]
    assert all(i["original_rank"] == i["rank"] for i in pinned["items"])
    doubled = live.post({**request, "steering": {"edits": [{"latent": top["latent"], "op": "scale", "value": 2}]}})
    before, after, move = scores_by_item_json(base), scores_by_item(doubled), direction(live, top["latent"])
    for item in set(before) & set(after):
        assert after[item] - before[item] == pytest.approx(top["activation"] * move[item], abs=1e-4)


def test_policies_and_the_query_string_form(live: Live) -> None:
    response = live.client.get("/v1/recommend", params={"user_id": live.user(5), "policy": "tail-boost", "explain": 1})
    body = response.json()
    assert response.status_code == 200 and body["policy"] == "tail-boost" and body["steering_applied"]
    (edit,) = body["explanation"]["edits"]
    assert edit["op"] == "nudge" and edit["unit"] == "std" and edit["after"] < edit["before"] + 1e-6
    concepts = [c["name"] for c in live.ref.catalog.concepts[:2]]
    response = live.client.get(
        "/v1/recommend", params={"user_id": live.user(5), "ablate": concepts[0], "steer": f"{concepts[1]}:1.5", "k": 3}
    )
    assert response.status_code == 200 and response.json()["steering_applied"], response.text
    policies = {p["name"]: p for p in live.client.get("/v1/policies").json()["policies"]}
    assert policies["tail-boost"]["usable"] and not policies["broken"]["usable"]


def test_explanation(live: Live) -> None:
    body = live.post({"user_id": live.user(2), "explain": True}).json()["explanation"]
    activations = [entry["activation"] for entry in body["latents"]]
    assert activations == sorted(activations, reverse=True) and 0 < body["l0"] <= live.ref.engine.sae.k
    assert all(1 <= entry["level"] <= 10 for entry in body["latents"])
    names = live.ref.catalog.latent_name
    assert all(entry["concept"] == names.get(entry["latent"]) for entry in body["latents"])
    assert body["fvu"] > 0 and body["edits"] == []


def test_concept_routes(live: Live) -> None:
    listing = live.client.get("/v1/concepts").json()
    assert len(listing["concepts"]) == len(live.ref.catalog.concepts)
    name = listing["concepts"][3]["name"]
    detail = live.client.get(f"/v1/concepts/{name}").json()
    assert detail["latent"] == listing["concepts"][3]["latent"] and len(detail["raises"]) == 10
    missing = live.client.get(f"/v1/concepts/{name}x")
    assert missing.status_code == 404 and f"did you mean '{name}'" in missing.json()["detail"]


def edits(*items: dict) -> dict:
    return {"json": {"user_id": "1", "steering": {"edits": list(items)}}}


BAD = [
    ("post", {"json": {"user_id": "no-such-user"}}, 404, "unknown user_id 'no-such-user'"),
    # Issue 15: an unknown history id is invalid input (422, was 404), and every unknown id is named at once.
    ("post", {"json": {"history": ["1", "no-such-item"]}}, 422, "unknown item id 'no-such-item' in history"),
    ("post", {"json": {"history": ["x1", "1", "x2", "x1"]}}, 422, "unknown item ids 'x1', 'x2' in history"),
    ("get", {"params": {"history": "x1,1,x2"}}, 422, "unknown item ids 'x1', 'x2' in history"),
    ("post", {"json": {"user_id": "1", "k": 0}}, 422, "k: Input should be greater than or equal to 1"),
    ("post", {"json": {"user_id": "1", "k": 101}}, 422, "k: must be between 1 and 100 (got 101)"),
    ("post", {"json": {"user_id": "1", "k": 2.5}}, 422, "k: Input should be a valid integer"),
    ("post", {"json": {"user_id": "1", "history": ["1"]}}, 422, "exactly one of 'user_id' or 'history'"),
    ("post", {"json": {"history": ["1"] * 61}}, 422, "history: 61 items; at most 60 are allowed"),
    (
        "post",
        edits({"latent": 1, "op": "boost"}),
        422,
        "steering.edits[0].op: Input should be 'ablate', 'pin', 'nudge' or 'scale'",
    ),
    (
        "post",
        edits({"latent": 1, "op": "pin", "unit": "z"}),
        422,
        "steering.edits[0].unit: Input should be 'raw', 'std' or 'max'",
    ),
    (
        "post",
        {"content": b'{"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "nudge", "value": Infinity}]}}'},
        422,
        "steering.edits[0].value",
    ),
    ("post", edits({"latent": 1, "op": "nudge", "value": 99, "unit": "std"}), 422, "exceeds the bound of 10.0 std"),
    ("post", edits({"latent": 9999, "op": "ablate"}), 422, "latent 9999 out of range [0, 256)"),
    (
        "post",
        edits({"latent": 4, "op": "ablate"}, {"latent": 4, "op": "pin"}),
        422,
        "edits 0 and 1 both target latent 4",
    ),
    ("post", {"json": {"user_id": "1", "steering": {"policy": "tail-bost"}}}, 422, "did you mean 'tail-boost'"),
    ("post", {"json": {"user_id": "1", "steering": {"policy": "broken"}}}, 422, "policy 'broken' cannot be used"),
    ("post", edits({"concept": "dramma-3", "op": "ablate"}), 422, "unknown concept 'dramma-3'; did you mean"),
    ("post", {"json": {"user_id": "1", "extra": 1}}, 422, "extra: unknown field"),
    ("post", {"content": b"{not json"}, 422, "not valid JSON"),
    ("post", {"content": b"[]"}, 422, "Input should be an object"),
    ("post", {"content": b" " * 5000}, 413, "request body of 5000 bytes exceeds the limit of 4096 bytes"),
    ("post", {"content": iter([b" " * 3000, b" " * 3000])}, 413, "request body exceeds the limit of 4096 bytes"),
    ("get", {"params": {"user_id": "1", "colour": "red"}}, 422, "unknown query parameter(s) ['colour']"),
    ("get", {"params": {"user_id": "1", "k": "ten"}}, 422, "k: expected an integer (got 'ten')"),
    ("get", {"params": {"user_id": "1", "steer": "drama"}}, 422, "steer: expected 'concept:value'"),
    ("get", {"params": {"user_id": "1", "explain": "maybe"}}, 422, "explain: expected true or false"),
]


@pytest.mark.parametrize(("method", "kwargs", "status", "needle"), BAD)
def test_bad_input_is_answered_precisely(live: Live, method: str, kwargs: dict, status: int, needle: str) -> None:
    response = getattr(live.client, method)("/v1/recommend", **kwargs)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]


def test_unknown_routes_are_404(live: Live) -> None:
    assert live.client.get("/v2/recommend").status_code == 404
    assert live.client.get("/healthz").json() == {"status": "ok"}


def _copy(bundle: Path, target: Path, corrupt: bool = False) -> Path:
    shutil.copytree(bundle, target)
    if corrupt:
        (target / "model.onnx").write_bytes((target / "model.onnx").read_bytes()[:-10] + b"0123456789")
    return target


def test_reconfigure_in_place_and_refuse_a_bad_bundle(live: Live, tmp_path: Path) -> None:
    before = live.client.get("/readyz").json()
    good, bad = _copy(live.bundle, tmp_path / "good"), _copy(live.bundle, tmp_path / "bad", corrupt=True)
    try:
        ready = live.service.update(max_k=150, batching=False)
        assert ready["pid"] == before["pid"] and ready["config"]["max_k"] == 150  # same process: no restart
        assert live.post({"user_id": live.user(1), "k": 150}).status_code == 200
        ready = live.service.update(bundle=str(good), batching=True, max_batch_size=4)
        assert (ready["pid"], ready["bundle"], ready["max_batch_size"]) == (before["pid"], str(good), 4)
        ready = live.service.update(bundle=str(bad))
        assert (
            ready["last_reload"]["outcome"] == "refused"
            and "model.onnx: sha256 does not match" in (ready["last_reload"]["error"])
        )
        assert ready["bundle"] == str(good) and ready["pid"] == before["pid"]
        assert live.post({"user_id": live.user(1)}).status_code == 200
    finally:
        live.service.update(bundle=str(live.bundle), max_k=100, batching=True, max_batch_size=8)


def test_bare_mode_skips_the_sae_and_serves_the_same_items(live: Live) -> None:
    request = {"user_id": live.user(40), "k": 10}
    monitored = live.post(request).json()
    try:
        live.service.update(sae=False)
        bare = live.post(request).json()
        refused = live.post({**request, "explain": True})
    finally:
        live.service.update(sae=True)
    assert bare["items"] == monitored["items"]
    assert refused.status_code == 409 and "sae=false" in refused.json()["detail"]


def test_kill_switch_serves_steering_requests_unsteered(live: Live) -> None:
    plain = live.post({"user_id": live.user(41), "k": 10}).json()
    steer = {
        "user_id": live.user(41),
        "k": 10,
        "steering": {"edits": [{"latent": 0, "op": "nudge", "value": 5, "unit": "std"}]},
    }
    try:
        live.service.update(steering=False)
        suppressed = live.post(steer)
        invalid = live.post({**steer, "steering": {"edits": [{"latent": 0, "op": "explode", "value": 1}]}})
    finally:
        live.service.update(steering=True)
    body = suppressed.json()
    assert (
        suppressed.status_code == 200
        and body["steering_applied"] is False
        and "kill switch" in body["steering_suppressed"]
    )
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in plain["items"]]
    assert invalid.status_code == 422  # edits are still validated while switched off


def test_admin_reload_needs_the_token(live: Live, tmp_path: Path) -> None:
    missing = live.client.post("/admin/reload", json={})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert live.client.post("/admin/reload", json={}, headers={"Authorization": "Bearer nope"}).status_code == 403
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = _copy(live.bundle, tmp_path / "bad", corrupt=True)
    refused = live.client.post("/admin/reload", json={"bundle": str(bad)}, headers=auth)
    assert refused.status_code == 422 and "model.onnx: sha256 does not match" in refused.json()["detail"]
    assert live.post({"user_id": live.user(1)}).status_code == 200
    reloaded = live.client.post("/admin/reload", json={}, headers=auth)
    assert reloaded.status_code == 200 and reloaded.json()["versions"] == live.ref.bundle.manifest["versions"]
    assert live.client.post("/noadmin/admin/reload", json={}, headers=auth).status_code == 404
    assert live.client.get("/noadmin/v1/recommend", params={"user_id": live.user(1)}).status_code == 200


def scrape(live: Live) -> dict[str, list]:
    """recsae samples from Ray's metrics export port, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(live.service.metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith("ray_recsae_"):
                out.setdefault(sample.name, []).append(sample)
    return out


def poll(live: Live, ready, timeout_s: float = 45.0) -> dict[str, list]:
    """Scrape until `ready(samples)` holds (Ray exports every ~1 s here, every 10 s by default)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(live)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_are_exported_with_bounded_labels(live: Live) -> None:
    live_latents = np.flatnonzero(live.ref.engine.sae.stats.std_activation.numpy() > 0)[:60]
    for wave in (live_latents[:30], live_latents[30:]):
        for latent in wave:  # every request turns on a different latent
            edit = {"latent": int(latent), "op": "nudge", "value": 2, "unit": "std"}
            assert (
                live.post(
                    {"user_id": live.user(int(latent)), "explain": True, "steering": {"edits": [edit]}}
                ).status_code
                == 200
            )
    for _ in range(3):
        live.post({"user_id": live.user(3), "steering": {"policy": "tail-boost"}})
    live.post({"user_id": "no-such-user"})

    def complete(samples: dict[str, list]) -> bool:
        route = {"route": "/v1/recommend", "method": "POST"}
        return (
            total(samples, "ray_recsae_requests_total", **route, outcome="ok", policy="custom") >= 60
            and total(samples, "ray_recsae_requests_total", **route, policy="tail-boost") >= 3
            and total(samples, "ray_recsae_requests_total", **route, outcome="not_found") >= 1
        )

    samples = poll(live, complete)
    assert complete(samples), {k: len(v) for k, v in samples.items()}
    expected = {
        "ray_recsae_requests_total",
        "ray_recsae_request_latency_ms_bucket",
        "ray_recsae_stage_latency_ms_bucket",
        "ray_recsae_batch_size_bucket",
        "ray_recsae_sae_l0_bucket",
        "ray_recsae_sae_fvu_bucket",
        "ray_recsae_concept_activations_total",
        "ray_recsae_steering_edits_total",
        "ray_recsae_served_items_total",
        "ray_recsae_served_tail_items_total",
        "ray_recsae_list_arp_bucket",
        "ray_recsae_list_tail_share_bucket",
        "ray_recsae_live_arp",
        "ray_recsae_live_tail_share",
        "ray_recsae_latent_drift",
        "ray_recsae_live_window_requests",
        "ray_recsae_bundle_info",
        "ray_recsae_bundle_reloads_total",
    }
    assert expected <= set(samples), expected - set(samples)
    stages = {s.labels["stage"] for s in samples["ray_recsae_stage_latency_ms_bucket"]}
    assert stages == {"represent", "sae", "rank", "total"}
    l0_sum, l0_count = total(samples, "ray_recsae_sae_l0_sum"), total(samples, "ray_recsae_sae_l0_count")
    assert l0_count >= 63 and 0 < l0_sum / l0_count <= live.ref.engine.sae.k
    assert total(samples, "ray_recsae_sae_fvu_count") == l0_count
    main = {"application": "recsae"}  # (the 'noadmin' app exports its own gauges)
    assert 0 <= total(samples, "ray_recsae_latent_drift", **main) <= 1
    assert total(samples, "ray_recsae_live_arp", **main) > 0
    assert 0 <= total(samples, "ray_recsae_live_tail_share", **main) <= 1
    assert total(samples, "ray_recsae_steering_edits_total", op="nudge") >= 63
    served = total(samples, "ray_recsae_served_items_total")
    assert 0 < total(samples, "ray_recsae_served_tail_items_total") <= served
    # Bounded label sets: concept labels are the first CAP catalogued names plus 'other', never one per latent.
    allowed = {c["name"] for c in sorted(live.ref.catalog.concepts, key=lambda c: c["latent"])[:CAP]} | {"other"}
    series = [s for s in samples["ray_recsae_concept_activations_total"] if s.labels["application"] == "recsae"]
    concepts = {s.labels["concept"] for s in series}
    assert concepts <= allowed and "other" in concepts
    assert not any("latent" in s.labels for series in samples.values() for s in series)
    assert sum(len(v) for v in samples.values()) < 1000
