"""The service's engine, schemas and metric helpers without Ray (the HTTP service is tested in test_service.py).

Uses a real bundle (SASRec on ML-100K + a TopK SAE, built by bundle_fixture or taken from $RECSAE_TEST_BUNDLE).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.numpy import load_file, save_file

from recsae_core.bundle.format import MANIFEST, InputSpec, sha256_file, write_manifest
from recsae_core.sae.edits import OPS, UNITS, Edit, op_problem
from recsae_core.sae.model import TopKSAE
from service.engine import Row
from service.errors import RequestError
from service.prometheus import OTHER, ConceptLabels, LiveWindow
from service.schemas import EditIn, RecommendRequest, ServiceConfig, validation_message
from service.served import Served
from service.steering import head_items, suggest

pytestmark = pytest.mark.slow
CONFIG = ServiceConfig(bundle="unused", max_k=50, max_history=20, max_edits=4)


@pytest.fixture(scope="module")
def served(service_bundle: Path) -> Served:
    return Served.load(service_bundle)


@pytest.fixture(scope="module")
def torch_sae(served: Served) -> TopKSAE:
    """The bundle's SAE as torch trains it: the independent reference for the numpy runtime."""
    return TopKSAE.load(served.bundle.sae_folder)


def parse(body: dict) -> RecommendRequest:
    return RecommendRequest.model_validate(body, context={"config": CONFIG})


def reference_scores(served: Served, user: int) -> np.ndarray:
    """The original model alone: ONNX h, dot product with the item matrix, seen items masked."""
    spec, session = served.bundle.inputs, served.engine.session
    h = session.run(None, {spec.history_input: served.bundle.user_inputs[spec.history_input][[user]]})[0]
    scores = h @ served.bundle.item_embeddings.T
    scores[0, served.bundle.seen(user)] = -np.inf
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


def test_the_schema_takes_ops_units_and_edit_rules_from_recsae_core() -> None:
    """One list of ops and units, one set of op rules: the HTTP schema's answers are recsae_core's op_problem."""
    assert EditIn.model_fields["op"].annotation.__args__ == OPS
    assert EditIn.model_fields["unit"].annotation.__args__ == UNITS
    bounds = CONFIG.edit_bounds()
    cases = (("ablate", 2.0, "raw"), ("scale", 2.0, "std"), ("scale", 20.0, "raw"), ("pin", 11.0, "std"))
    for op, value, unit in cases:
        problem = op_problem(op, value, unit, bounds)
        with pytest.raises(ValidationError) as info:
            parse({"user_id": "1", "steering": {"edits": [{"latent": 1, "op": op, "value": value, "unit": unit}]}})
        assert problem is not None and validation_message(info.value) == f"steering.edits[0]: {problem}"
    assert op_problem("nudge", 2.0, "max", bounds) is None


def test_non_finite_values_are_refused_from_json() -> None:
    body = b'{"user_id": "1", "steering": {"edits": [{"latent": 1, "op": "nudge", "value": NaN}]}}'
    with pytest.raises(ValidationError) as info:
        RecommendRequest.model_validate_json(body, context={"config": CONFIG})
    assert "value" in validation_message(info.value) or "JSON" in validation_message(info.value)
    with pytest.raises(ValidationError) as info:
        RecommendRequest.model_validate_json(b'{"user_id": "1", "k": 1e400}', context={"config": CONFIG})


def test_passthrough_is_the_original_model(served: Served) -> None:
    users = [0, 5, 100]
    rows = [served.requests.parse(parse({"user_id": served.bundle.user_ids[u], "k": 20})) for u in users]
    results, timings = served.engine.recommend(rows)
    assert set(timings) == {"represent", "sae", "rank", "total"}
    for user, result in zip(users, results, strict=True):
        reference = reference_scores(served, user)
        order = np.argsort(-reference, kind="stable")[:20]
        np.testing.assert_array_equal(result.items, order)
        np.testing.assert_allclose(result.scores, reference[order], atol=1e-5)
        assert result.fvu is not None and 0 < len(result.latents) <= served.engine.sae.k


def test_monitoring_path_matches_the_torch_sae(served: Served, torch_sae: TopKSAE) -> None:
    """The numpy monitoring path reports the same active latents, values and FVU as the SAE itself."""
    engine = served.engine
    rows = [Row(user=u) for u in range(12)]
    results, _ = engine.recommend(rows, sae=True)
    h = torch.from_numpy(engine.represent(rows))
    with torch.no_grad():
        z = torch_sae.encode(h)
        err = (torch_sae.decode(z) - h).pow(2).sum(1) / engine.h_var
    for i, result in enumerate(results):
        active = torch.nonzero(z[i]).squeeze(1)
        expected = active[torch.argsort(-z[i, active], stable=True)].numpy()
        np.testing.assert_array_equal(result.latents, expected)
        np.testing.assert_allclose(result.activations, z[i, expected].numpy(), rtol=1e-5, atol=1e-6)
        assert result.fvu == pytest.approx(float(err[i]), rel=1e-4, abs=1e-6)


def test_runtime_encode_equals_the_torch_sae_on_real_h(served: Served, torch_sae: TopKSAE) -> None:
    """On the bundle's real representations (ML-100K users through the exported SASRec), the runtime's sparse codes
    are the torch SAE's dense codes: the same latents, as strongly, listed strongest first."""
    h = served.engine.represent([Row(user=u) for u in range(0, len(served.bundle.user_ids), 7)])
    codes = served.engine.sae.encode(h)
    with torch.no_grad():
        dense = torch_sae.encode(torch.from_numpy(h)).numpy()
    np.testing.assert_allclose(codes.dense(torch_sae.cfg.n_latents), dense, rtol=1e-5, atol=1e-5)
    assert np.array_equal(codes.dense(torch_sae.cfg.n_latents) > 0, dense > 0)
    assert np.all(np.diff(codes.values, axis=1) <= 0)


def test_engine_steering_matches_the_algebra_on_the_torch_sae(served: Served, torch_sae: TopKSAE) -> None:
    """The runtime's steering, as the engine runs it (on the codes it monitored), against an independent
    computation for every op and unit: z from the torch SAE, z' by hand from the op's definition and the unit's
    statistic, h' = h + (z' - z) W_dec in torch."""
    engine, stats = served.engine, served.engine.sae.stats
    rows = [Row(user=u) for u in range(6)]
    plain, _ = engine.recommend(rows)
    active = [int(r.latents[0]) for r in plain]
    silent = int(np.argsort(stats.frequency.numpy())[-1])  # a live latent, usually inactive for a given user
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
    h_engine, z, z_new = engine.sae.steer(h, edits, engine.sae.monitor(h, engine.h_var).codes)
    with torch.no_grad():
        z_ref = torch_sae.encode(torch.from_numpy(h))
        z_new_ref = z_ref.clone()
        for row, row_edits in enumerate(edits):
            for e in row_edits:
                unit = {"raw": 1.0, "std": float(stats.std_activation[e.latent]),
                        "max": float(stats.max_activation[e.latent])}[e.unit]  # fmt: skip
                now, v = z_ref[row, e.latent], e.value * unit
                z_new_ref[row, e.latent] = {"ablate": 0.0, "pin": v, "nudge": now + v, "scale": now * v}[e.op]
        h_ref = torch.from_numpy(h) + (z_new_ref - z_ref) @ torch_sae.W_dec
    assert {e.op for row_edits in edits for e in row_edits} == set(OPS)
    assert {e.unit for row_edits in edits for e in row_edits} == set(UNITS)
    np.testing.assert_allclose(z, z_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(h_engine, h_ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z_new, z_new_ref.numpy(), rtol=1e-5, atol=1e-5)
    assert np.array_equal(h_engine[4], h[4])  # a row without edits is untouched, bit for bit
    # The engine serves exactly these h': its steered scores are h' E^T.
    for row in rows:
        row.k, row.exclude_seen = 5, False
    results, _ = engine.recommend(rows)
    served_scores = engine.scores(h_engine)
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.scores, served_scores[i, result.items])


def test_steering_only_touches_edited_rows_and_matches_the_formula(served: Served) -> None:
    engine = served.engine
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
    direction = engine.sae.w_dec[latent] @ engine.emb_t
    common = np.intersect1d(ablated.items, plain.items)
    delta = {i: s for i, s in zip(ablated.items, ablated.scores, strict=True)}
    before = {i: s for i, s in zip(plain.items, plain.scores, strict=True)}
    for item in common:
        assert delta[item] - before[item] == pytest.approx(-z * direction[item], abs=1e-4)
    assert ablated.original_ranks is not None and len(ablated.original_ranks) == len(ablated.items)


def test_history_requests_and_masking(served: Served) -> None:
    history = [served.responses.item_ids[i] for i in (10, 20, 30)]
    row = served.requests.parse(parse({"history": history, "k": 50}))
    result = served.engine.recommend([row])[0][0]
    assert not set(result.items) & {10, 20, 30}
    row.exclude_seen = False
    assert len(served.engine.recommend([row])[0][0].items) == 50
    # Issue 15: an unknown history id is invalid input (422, was 404), and every unknown id is named, once each.
    with pytest.raises(RequestError) as info:
        served.requests.parse(parse({"history": ["no-such-item"]}))
    assert (info.value.status, info.value.message) == (422, "unknown item id 'no-such-item' in history")
    with pytest.raises(RequestError) as info:
        served.requests.parse(parse({"history": ["x1", history[0], "x2", "x1", 99999999]}))
    assert (info.value.status, info.value.message) == (422, "unknown item ids 'x1', 'x2', '99999999' in history")
    with pytest.raises(RequestError) as info:
        served.requests.parse(parse({"user_id": "no-such-user"}))
    assert info.value.status == 404 and "'no-such-user'" in info.value.message


def test_custom_input_models_refuse_histories(served: Served) -> None:
    # A bundle wrapping someone else's ONNX model ('custom' inputs) cannot fold in a history: a copy of the real
    # request parser with the input kind swapped stands in for such a bundle (building one needs a foreign model).
    custom = copy.copy(served.requests)
    custom.bundle = dataclasses.replace(served.bundle, inputs=InputSpec("custom", ["features"]))
    with pytest.raises(RequestError) as info:
        custom.parse(parse({"history": [served.responses.item_ids[0]]}))
    assert info.value.status == 422 and "only known user_ids" in info.value.message


def test_bundles_without_the_recipe_fields_serve_as_before(served: Served, tmp_path: Path) -> None:
    """A bundle written before model_index and padding existed reads with the defaults that mean what it always
    meant; writing those defaults out explicitly changes nothing, bit for bit, for users and histories."""
    bundle = served.bundle
    assert set(bundle.manifest["inputs"]) == {"kind", "names", "history_input", "max_len", "pad_id"}
    assert bundle.model_index is None and "model_index" not in load_file(str(bundle.folder / "items.safetensors"))
    assert (bundle.inputs.padding, bundle.inputs.length_input) == ("left", None)
    explicit = tmp_path / "bundle"
    shutil.copytree(bundle.folder, explicit)
    items = explicit / "items.safetensors"
    save_file({**load_file(str(items)), "model_index": np.arange(bundle.n_items, dtype=np.int64)}, str(items))
    manifest = json.loads((explicit / MANIFEST).read_text())
    manifest["files"]["items.safetensors"] = sha256_file(items)
    manifest["inputs"].update(padding="left", length_input=None)
    write_manifest(explicit, manifest)
    again = Served.load(explicit)
    assert again.bundle.model_index is not None
    rng = np.random.default_rng(5)
    rows = [Row(user=int(u), k=20) for u in rng.choice(len(bundle.user_ids), 10)]
    rows += [Row(history=rng.choice(bundle.n_items, n, replace=False), k=20) for n in (1, 7, 50, 80)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    np.testing.assert_array_equal(again.engine.represent(rows), served.engine.represent(rows))
    for old, new in zip(served.engine.recommend(rows)[0], again.engine.recommend(rows)[0], strict=True):
        np.testing.assert_array_equal(old.items, new.items)
        np.testing.assert_array_equal(old.scores, new.scores)


def test_concepts_policies_and_conflicts(served: Served) -> None:
    catalog, requests = served.catalog, served.requests
    concept = catalog.concepts[0]["name"]
    latent = catalog.concepts[0]["latent"]
    body = {
        "user_id": "1",
        "steering": {"edits": [{"concept": concept, "op": "ablate"}, {"latent": latent, "op": "pin"}]},
    }
    with pytest.raises(RequestError, match="conflicts with edit 0"):
        requests.parse(parse(body))
    tail = catalog.policies["tail-boost"].edits[0].latent
    body = {"user_id": "1", "steering": {"policy": "tail-boost", "edits": [{"latent": tail, "op": "ablate"}]}}
    with pytest.raises(RequestError, match="conflicts with policy 'tail-boost'"):
        requests.parse(parse(body))
    with pytest.raises(RequestError, match="did you mean 'tail-boost'"):
        requests.parse(parse({"user_id": "1", "steering": {"policy": "tail-bost"}}))
    with pytest.raises(RequestError, match="policy 'broken' cannot be used"):
        requests.parse(parse({"user_id": "1", "steering": {"policy": "broken"}}))
    with pytest.raises(RequestError, match=f"did you mean '{concept}'"):
        requests.parse(parse({"user_id": "1", "steering": {"edits": [{"concept": concept + "x", "op": "ablate"}]}}))
    with pytest.raises(RequestError, match="sae=false"):
        requests.parse(parse({"user_id": "1", "explain": True}), sae=False)
    huge = float(served.engine.sae.stats.std_activation[latent]) * 50
    with pytest.raises(RequestError, match="beyond the bound"):
        requests.parse(parse({"user_id": "1", "steering": {"edits": [{"latent": latent, "op": "pin", "value": huge}]}}))
    detail = served.responses.concept_detail(concept.upper())
    assert detail["latent"] == latent and len(detail["raises"]) == 10


def test_explanation_levels(served: Served) -> None:
    row = served.requests.parse(parse({"user_id": "1", "explain": True, "steering": {"policy": "tail-boost"}}))
    result = served.engine.recommend([row])[0][0]
    explanation = served.responses.recommend(row, result, explain_top=5)["explanation"]
    stats = served.engine.sae.stats
    values = [entry["activation"] for entry in explanation["latents"]]
    assert values == sorted(values, reverse=True) and len(values) <= 5
    assert all(1 <= entry["level"] <= 10 for entry in explanation["latents"])
    expected = 1 + torch.bucketize(torch.tensor(values), stats.global_deciles, right=True)
    assert [e["level"] for e in explanation["latents"]] == expected.tolist()
    (edit,) = explanation["edits"]
    assert edit["after"] == pytest.approx(edit["before"] - 2 * float(stats.std_activation[edit["latent"]]))


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
