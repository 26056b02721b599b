"""The service's engine, schemas and metric helpers without Ray (the HTTP service is tested in test_service.py).

Uses a real bundle (SASRec on ML-100K + a TopK SAE, built by bundle_fixture or taken from $RECSAE_TEST_BUNDLE).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_fixture import build_test_bundle
from pydantic import ValidationError

from recsae_core.bundle.format import InputSpec
from recsae_core.sae.edits import Edit
from service.engine import Engine, Row
from service.prometheus import OTHER, ConceptLabels, LiveWindow
from service.schemas import RecommendRequest, ServiceConfig, validation_message
from service.steering import RequestError, head_items, suggest

pytestmark = pytest.mark.slow
CONFIG = ServiceConfig(bundle="unused", max_k=50, max_history=20, max_edits=4)


@pytest.fixture(scope="session")
def service_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_bundle(tmp_path_factory.getbasetemp() / "service-bundle")


@pytest.fixture(scope="module")
def engine(service_bundle: Path) -> Engine:
    return Engine.load(service_bundle)


def parse(body: dict) -> RecommendRequest:
    return RecommendRequest.model_validate(body, context={"config": CONFIG})


def reference_scores(engine: Engine, user: int) -> np.ndarray:
    """The original model alone: ONNX h, dot product with the item matrix, seen items masked."""
    spec = engine.bundle.inputs
    h = engine.session.run(None, {spec.history_input: engine.bundle.user_inputs[spec.history_input][[user]]})[0]
    scores = h @ engine.bundle.item_embeddings.T
    scores[0, engine.bundle.seen(user)] = -np.inf
    return scores[0]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"user_id": "1", "k": 0}, "k: Input should be greater than or equal to 1"),
        ({"user_id": "1", "k": 51}, "k: must be between 1 and 50 (got 51)"),
        ({"user_id": "1", "k": "5"}, "k: Input should be a valid integer"),
        ({"user_id": "1", "history": ["1"]}, "exactly one of 'user_id' or 'history'"),
        ({}, "exactly one of 'user_id' or 'history'"),
        ({"history": []}, "history: must list at least one item id"),
        ({"history": ["1"] * 21}, "21 items; at most 20"),
        ({"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "boost"}]}}, "steering.edits[0].op: Input should"),
        ({"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "pin", "unit": "sd"}]}}, "edits[0].unit"),
        ({"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "ablate", "value": 2}]}}, "ablate takes no value"),
        ({"user_id": "1", "steering": {"edits": [{"op": "ablate"}]}}, "exactly one of 'concept' or 'latent'"),
        ({"user_id": "1", "steering": {"edits": [{"latent": 1, "concept": "x", "op": "ablate"}]}}, "exactly one"),
        ({"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "nudge", "value": 11, "unit": "std"}]}}, "bound"),
        ({"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "scale", "value": 20}]}}, "scale factor 20"),
        ({"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "scale", "unit": "std", "value": 2}]}}, "units"),
        ({"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "ablate"}] * 2}}, "edits 0 and 1 both target"),
        ({"user_id": "1", "steering": {"edits": [{"latent": i, "op": "ablate"} for i in range(5)]}}, "at most 4"),
        ({"user_id": "1", "steering": {"edits": [{"latent": -1, "op": "ablate"}]}}, "greater than or equal to 0"),
        ({"user_id": "1", "colour": "red"}, "colour: unknown field"),
    ],
)
def test_schema_messages(body: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(body)
    assert needle in validation_message(info.value)


def test_non_finite_values_are_refused_from_json() -> None:
    body = b'{"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "nudge", "value": NaN}]}}'
    with pytest.raises(ValidationError) as info:
        RecommendRequest.model_validate_json(body, context={"config": CONFIG})
    assert "value" in validation_message(info.value) or "JSON" in validation_message(info.value)
    with pytest.raises(ValidationError) as info:
        RecommendRequest.model_validate_json(b'{"user_id": "1", "k": 1e400}', context={"config": CONFIG})


def test_passthrough_is_the_original_model(engine: Engine) -> None:
    users = [0, 5, 100]
    rows = [engine.parse(parse({"user_id": engine.bundle.user_ids[u], "k": 20})) for u in users]
    results, timings = engine.recommend(rows)
    assert set(timings) == {"represent", "sae", "rank", "total"}
    for user, result in zip(users, results, strict=True):
        reference = reference_scores(engine, user)
        order = np.argsort(-reference, kind="stable")[:20]
        np.testing.assert_array_equal(result.items, order)
        np.testing.assert_allclose(result.scores, reference[order], atol=1e-5)
        assert result.fvu is not None and 0 < len(result.latents) <= engine.sae.cfg.k


def test_monitoring_path_matches_the_torch_sae(engine: Engine) -> None:
    """The numpy monitoring path reports the same active latents, values and FVU as the SAE itself."""
    rows = [Row(user=u) for u in range(12)]
    results, _ = engine.recommend(rows, sae=True)
    h = torch.from_numpy(engine.represent(rows))
    with torch.no_grad():
        z = engine.sae.encode(h)
        err = (engine.sae.decode(z) - h).pow(2).sum(1) / engine.h_var
    for i, result in enumerate(results):
        active = torch.nonzero(z[i]).squeeze(1)
        expected = active[torch.argsort(-z[i, active], stable=True)].numpy()
        np.testing.assert_array_equal(result.latents, expected)
        np.testing.assert_allclose(result.activations, z[i, expected].numpy(), rtol=1e-5, atol=1e-6)
        assert result.fvu == pytest.approx(float(err[i]), rel=1e-4, abs=1e-6)


def test_engine_steering_matches_the_library_intervener(engine: Engine) -> None:
    """The engine's numpy steering path and recsae_core's torch Intervener give the same h' for every op and unit."""
    from recsae_core.sae.edits import Edit, Intervener

    rows = [Row(user=u) for u in range(6)]
    plain, _ = engine.recommend(rows)
    active = [int(r.latents[0]) for r in plain]
    silent = int(np.argsort(engine.stats.frequency.numpy())[-1])  # a live latent, usually inactive for a given user
    edits = [
        [Edit(active[0], "ablate", 0.0, "raw")],
        [Edit(active[1], "scale", 0.5, "raw"), Edit(silent, "nudge", 1.0, "std")] if active[1] != silent else [],
        [Edit(active[2], "pin", 0.5, "max")],
        [Edit(active[3], "nudge", -0.5, "std")],
        [],
        [Edit(silent, "pin", 2.0, "std")],
    ]
    for row, row_edits in zip(rows, edits, strict=True):
        row.edits = row_edits
    h = engine.represent(rows)
    h_engine, z, z_new = engine._steer(h, rows, engine._observe(h))
    np.testing.assert_allclose(z, engine.sae.encode(torch.from_numpy(h)).detach().numpy(), atol=1e-5)
    with torch.no_grad():
        reference = Intervener(engine.sae, engine.stats, engine.bounds).apply(torch.from_numpy(h), edits)
    np.testing.assert_allclose(h_engine, reference.h_new.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z_new, reference.z_new.numpy(), rtol=1e-5, atol=1e-5)
    assert np.array_equal(h_engine[4], h[4])  # a row without edits is untouched, bit for bit


def test_steering_only_touches_edited_rows_and_matches_the_formula(engine: Engine) -> None:
    plain, = engine.recommend([Row(user=3, k=30, exclude_seen=False)])[0]  # fmt: skip
    latent = int(plain.latents[0])
    z = float(plain.activations[0])
    rows = [
        Row(user=3, k=30, exclude_seen=False),
        Row(user=3, k=30, exclude_seen=False, edits=[Edit(latent, "ablate")]),
    ]
    unsteered, ablated = engine.recommend(rows)[0]
    np.testing.assert_array_equal(unsteered.items, plain.items)  # the unedited row in a mixed batch is untouched
    np.testing.assert_allclose(unsteered.scores, plain.scores, atol=1e-5)  # (batch size can change float rounding)
    # Ablating an active latent removes z_j W_dec[j] from h: every score moves by -z_j <W_dec[j], e_i>.
    direction = engine.sae.W_dec[latent].detach().numpy() @ engine.emb_t
    common = np.intersect1d(ablated.items, plain.items)
    delta = {i: s for i, s in zip(ablated.items, ablated.scores, strict=True)}
    before = {i: s for i, s in zip(plain.items, plain.scores, strict=True)}
    for item in common:
        assert delta[item] - before[item] == pytest.approx(-z * direction[item], abs=1e-4)
    assert ablated.original_ranks is not None and len(ablated.original_ranks) == len(ablated.items)


def test_history_requests_and_masking(engine: Engine) -> None:
    history = [engine.item_ids[i] for i in (10, 20, 30)]
    row = engine.parse(parse({"history": history, "k": 50}))
    result = engine.recommend([row])[0][0]
    assert not set(result.items) & {10, 20, 30}
    row.exclude_seen = False
    assert len(engine.recommend([row])[0][0].items) == 50
    with pytest.raises(RequestError) as info:
        engine.parse(parse({"history": ["no-such-item"]}))
    assert (info.value.status, info.value.message) == (404, "unknown item id 'no-such-item' in history")
    with pytest.raises(RequestError) as info:
        engine.parse(parse({"user_id": "no-such-user"}))
    assert info.value.status == 404 and "'no-such-user'" in info.value.message


def test_custom_input_models_refuse_histories(engine: Engine) -> None:
    # A bundle wrapping someone else's ONNX model ('custom' inputs) cannot fold in a history: a copy of the real
    # engine with the input kind swapped stands in for such a bundle (building one needs a foreign model).
    custom = copy.copy(engine)
    custom.bundle = dataclasses.replace(engine.bundle, inputs=InputSpec("custom", ["features"]))
    with pytest.raises(RequestError) as info:
        custom.parse(parse({"history": [engine.item_ids[0]]}))
    assert info.value.status == 422 and "only known user_ids" in info.value.message


def test_concepts_policies_and_conflicts(engine: Engine) -> None:
    concept = engine.catalog.concepts[0]["name"]
    latent = engine.catalog.concepts[0]["latent"]
    body = {
        "user_id": "1",
        "steering": {"edits": [{"concept": concept, "op": "ablate"}, {"latent": latent, "op": "pin"}]},
    }
    with pytest.raises(RequestError, match="conflicts with edit 0"):
        engine.parse(parse(body))
    tail = engine.catalog.policies["tail-boost"].edits[0].latent
    body = {"user_id": "1", "steering": {"policy": "tail-boost", "edits": [{"latent": tail, "op": "ablate"}]}}
    with pytest.raises(RequestError, match="conflicts with policy 'tail-boost'"):
        engine.parse(parse(body))
    with pytest.raises(RequestError, match="did you mean 'tail-boost'"):
        engine.parse(parse({"user_id": "1", "steering": {"policy": "tail-bost"}}))
    with pytest.raises(RequestError, match="policy 'broken' cannot be used"):
        engine.parse(parse({"user_id": "1", "steering": {"policy": "broken"}}))
    with pytest.raises(RequestError, match=f"did you mean '{concept}'"):
        engine.parse(parse({"user_id": "1", "steering": {"edits": [{"concept": concept + "x", "op": "ablate"}]}}))
    with pytest.raises(RequestError, match="sae=false"):
        engine.parse(parse({"user_id": "1", "explain": True}), sae=False)
    huge = float(engine.stats.std_activation[latent]) * 50
    with pytest.raises(RequestError, match="beyond the bound"):
        engine.parse(parse({"user_id": "1", "steering": {"edits": [{"latent": latent, "op": "pin", "value": huge}]}}))
    detail = engine.concept_detail(concept.upper())
    assert detail["latent"] == latent and len(detail["raises"]) == 10


def test_explanation_levels(engine: Engine) -> None:
    row = engine.parse(parse({"user_id": "1", "explain": True, "steering": {"policy": "tail-boost"}}))
    result = engine.recommend([row])[0][0]
    explanation = engine.response(row, result, explain_top=5)["explanation"]
    values = [entry["activation"] for entry in explanation["latents"]]
    assert values == sorted(values, reverse=True) and len(values) <= 5
    assert all(1 <= entry["level"] <= 10 for entry in explanation["latents"])
    expected = 1 + torch.bucketize(torch.tensor(values), engine.stats.global_deciles, right=True)
    assert [e["level"] for e in explanation["latents"]] == expected.tolist()
    (edit,) = explanation["edits"]
    assert edit["after"] == pytest.approx(edit["before"] - 2 * float(engine.stats.std_activation[edit["latent"]]))


def test_concept_labels_are_capped() -> None:
    labels = ConceptLabels({i: f"c{i}" for i in range(100)}, n_latents=200, cap=8)
    assert labels.labels == [f"c{i}" for i in range(8)] + [OTHER]
    counts = labels.counts([np.array([0, 50, 150]), np.array([60, 70, 1])])
    assert counts == {"c0": 1, "c1": 1, OTHER: 2}  # 150 is uncatalogued; 'other' counts once per request


def test_live_window_drift_and_popularity() -> None:
    window = LiveWindow(np.array([0.5, 0.5, 0.0, 0.0]), size=2)
    window.add(np.array([0, 1]), arp=10.0, tail_share=0.0)
    assert window.drift() == pytest.approx(0.0)
    window.add(np.array([2]), arp=20.0, tail_share=1.0)
    window.add(np.array([3]), arp=30.0, tail_share=1.0)  # evicts the first request
    assert window.drift() == pytest.approx(1.0)
    assert (window.arp(), window.tail_share()) == (25.0, 1.0)


def test_head_items_hold_a_fifth_of_interactions() -> None:
    popularity = np.array([50, 30, 10, 5, 5])
    assert head_items(popularity).tolist() == [True, False, False, False, False]
    assert head_items(np.array([10, 10, 10, 10, 10])).sum() == 1
    assert "did you mean 'drama'" in suggest("dram", ["drama", "comedy"], "concept")


def test_metric_updates_are_buffered_and_summed_until_flush():
    """The buffering logic alone, against recording stand-ins for Ray's metric objects (the real Ray metrics and
    their Prometheus export are checked end to end in test_service.py's scrape test)."""
    from collections import defaultdict

    from service.prometheus import ServiceMetrics

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[float, dict | None]] = []

        def inc(self, value: float, tags: dict | None = None) -> None:
            self.calls.append((value, tags))

        observe = inc

    metrics = ServiceMetrics.__new__(ServiceMetrics)  # skip Ray's metric registration
    metrics._counts, metrics._observations = defaultdict(float), []
    counter, histogram = Recorder(), Recorder()
    for _ in range(3):
        metrics._inc(counter, 1, tags={"policy": "none", "route": "/v1"})
        metrics._observe(histogram, 2.5, tags={"route": "/v1"})
    metrics._inc(counter, 2, tags={"route": "/v1", "policy": "popularity"})
    assert counter.calls == [] and histogram.calls == []  # nothing reaches Ray on the request path
    metrics.flush()
    assert sorted(counter.calls, key=lambda c: c[0]) == [
        (2, {"policy": "popularity", "route": "/v1"}),
        (3, {"policy": "none", "route": "/v1"}),
    ]
    assert histogram.calls == [(2.5, {"route": "/v1"})] * 3
    metrics.flush()
    assert len(counter.calls) == 2 and len(histogram.calls) == 3  # a flush sends each update once
