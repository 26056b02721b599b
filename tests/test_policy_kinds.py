"""The transforms behind the fitted policy kinds (recsae_core.debias.transforms), their file format and checks
(policy_kinds), and the SAE runtime parts they use (pre-activation shift, weighted edits), on constructed cases
whose answers are known: an eraser leaves a linear classifier at chance, PopSteer on a tiny SAE against numbers
worked out by hand, the spectral shrink against the SVD of H E^T. Last, the round trip of the test bundle's fitted
policies (written, bundled, loaded by the service's catalog) and the refusal of mismatched ones."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fitted_policies import bundle_h, gender
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from recsae_core.bundle.format import load_bundle
from recsae_core.common.errors import ConfigError
from recsae_core.data.datasets import Dataset
from recsae_core.debias import transforms as tf
from recsae_core.debias.policy_kinds import (
    apply_policy,
    fit_calibrated,
    fit_erase,
    fit_popsteer_policy,
    fit_spectral_policy,
    offline_transform,
    parse_policy,
    policy_document,
    with_report,
)
from recsae_core.sae.edits import Edit, EditBounds
from recsae_core.sae.runtime import SAERuntime
from recsae_core.sae.stats import LatentStats
from service.errors import RequestError
from service.steering import Catalog

MADE_FOR = {"dataset": "toy", "model_type": "toy", "sae_sha256": "ab" * 32}


def gendered(n: int, seed: int, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """h whose group (30% of rows) is linearly readable along a direction mixed into every coordinate."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(d, d))
    z = rng.random(n) < 0.3
    h = rng.normal(size=(n, d)) @ mix + np.outer(z, np.random.default_rng(98).normal(size=d)) * 2.0 + 0.7
    return h.astype(np.float32), z


def linear_classifier(train: tuple, test: tuple) -> tuple[float, float]:
    """A logistic regression fit on `train`: its held-out AUC on `test` and the spread (std) of its scores on train."""
    clf = LogisticRegression(C=1e4, max_iter=2000).fit(*train)
    return roc_auc_score(test[1], clf.decision_function(test[0])), float(clf.decision_function(train[0]).std())


@pytest.mark.parametrize("anchor", ["pooled", "midpoint"])
def test_leace_leaves_a_linear_classifier_at_chance(anchor: str) -> None:
    (h, z), (h_test, z_test) = gendered(5000, 0), gendered(5000, 1)
    before, spread = linear_classifier((h, z), (h_test, z_test))
    eraser = tf.fit_leace(h, z, 1, anchor)
    erased, erased_test = eraser.apply(h), eraser.apply(h_test)
    after, spread_after = linear_classifier((erased, z), (erased_test, z_test))
    assert before > 0.85
    # The best linear predictor on erased h is a constant (its scores do not vary), and held-out AUC is chance.
    assert spread_after < 1e-4 * spread
    assert abs(after - 0.5) < 0.03
    np.testing.assert_allclose(eraser.b @ eraser.a.T, [[1.0]], atol=1e-5)  # oblique projection: B A^T = I
    assert np.array_equal(eraser.apply(h, 0.0), h)  # strength 0 is the identity, bit for bit
    m = tf.anchor_point(h, z, anchor)
    expected = (h[z].mean(0) + h[~z].mean(0)) / 2 if anchor == "midpoint" else h.mean(0)
    np.testing.assert_allclose(m, expected, rtol=1e-5)
    np.testing.assert_allclose(eraser.anchor, expected, rtol=1e-5, atol=1e-6)
    # the read-out of every row lands on the anchor's
    np.testing.assert_allclose(eraser.coefficients(erased), 0.0, atol=1e-3)


def test_leace_rank_needs_that_many_attribute_directions() -> None:
    h, z = gendered(800, 2)
    other = (h[:, 0] > np.median(h[:, 0])).astype(float)
    two = tf.fit_leace(h, np.stack([z.astype(float), other], 1), rank=2)
    assert two.rank == 2
    np.testing.assert_allclose(two.b @ two.a.T, np.eye(2), atol=1e-4)
    with pytest.raises(ConfigError, match=r"rank 2: .* 1 direction"):
        tf.fit_leace(h, z, rank=2)
    with pytest.raises(ConfigError, match="both groups"):
        tf.fit_leace(h, np.ones(len(h), bool))
    with pytest.raises(ConfigError, match="unknown anchor"):
        tf.fit_leace(h, z, 1, "median")


def test_inlp_directions_are_the_classifiers_and_orthonormal() -> None:
    (h, z), (h_test, z_test) = gendered(4000, 3), gendered(4000, 4)
    eraser = tf.fit_inlp(h, z, rank=3)
    np.testing.assert_array_equal(eraser.a, eraser.b)
    np.testing.assert_allclose(eraser.a @ eraser.a.T, np.eye(3), atol=1e-5)
    # round 1 is the plain logistic direction: sklearn's at the same L2 penalty (1e-3 on h scaled to unit variance)
    scaled = (h - h.mean(0)) / np.sqrt(h.var(0).mean())
    first = LogisticRegression(C=1 / (1e-3 * len(h)), max_iter=5000, tol=1e-10).fit(scaled, z).coef_[0]
    assert abs(first @ eraser.a[0]) / np.linalg.norm(first) > 0.9999
    erased = eraser.apply(h)
    np.testing.assert_allclose(eraser.apply(erased), erased, atol=1e-4)  # a projection: idempotent at t = 1
    np.testing.assert_allclose(eraser.coefficients(erased), 0.0, atol=1e-4)
    before, _ = linear_classifier((h, z), (h_test, z_test))
    after, _ = linear_classifier((erased, z), (eraser.apply(h_test), z_test))
    assert after < before - 0.1


def test_mean_difference_projection_equalises_the_group_means() -> None:
    h, z = gendered(3000, 5)
    eraser = tf.fit_mean_difference(h, z, "midpoint")
    v = h[z].mean(0) - h[~z].mean(0)
    np.testing.assert_allclose(eraser.a[0], v / np.linalg.norm(v), rtol=1e-5)
    erased = eraser.apply(h)
    np.testing.assert_allclose(erased[z].mean(0), erased[~z].mean(0), atol=1e-4)
    half = eraser.apply(h, 0.5)
    np.testing.assert_allclose(half[z].mean(0) - half[~z].mean(0), v / 2, atol=1e-4)


def test_spectral_shrink_removes_the_top_singular_components_of_the_scores() -> None:
    rng = np.random.default_rng(6)
    h, emb = rng.normal(size=(400, 8)) + 1.0, rng.normal(size=(250, 8)) + 0.5
    scores = h @ emb.T
    u, s, vt = np.linalg.svd(scores, full_matrices=False)
    for rank, t in ((1, 1.0), (2, 1.0), (1, 0.5)):
        shrink = tf.fit_spectral(h, emb, rank)
        np.testing.assert_allclose(shrink.anchor, 0.0)
        expected = scores - t * (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(shrink.apply(h, t) @ emb.T, expected, atol=1e-3 * np.abs(scores).max())


def test_calibration_gap_by_hand() -> None:
    popularity = np.array([1, 9, 99, 0])
    lists = np.array([[1, 2], [0, 3], [1, 2]])
    histories = [np.array([0, 3]), np.array([2]), np.array([], dtype=np.int64)]
    gap = tf.calibration_gap(lists, histories, popularity)
    expected = (math.log(10) + math.log(100)) / 2 - math.log(2) / 2
    np.testing.assert_allclose(gap, [expected, 0.0, 0.0], rtol=1e-6)  # less popular than the history / no history


def test_calibrated_policy_moves_each_user_by_its_gap() -> None:
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(300, 6))
    log_pop = emb @ np.array([1.0, -0.5, 0.3, 0.0, 0.2, 0.1]) + 0.05 * rng.normal(size=300)
    popularity = np.round(np.expm1(log_pop - log_pop.min() + 0.5)).astype(np.int64)
    h = rng.normal(size=(50, 6)).astype(np.float32)
    policy = fit_calibrated(h, emb, popularity, strength=0.8, list_k=5)
    p = policy.arrays["direction"]
    assert np.corrcoef(emb @ p, np.log1p(popularity))[0, 1] > 0.95
    scores = h @ emb.T
    histories = [rng.choice(300, 7, replace=False) for _ in h]
    for row, items in enumerate(histories):
        scores[row, items] = -np.inf
    transform = offline_transform(policy, 1.5, unsteered_scores=scores, histories=histories, popularity=popularity)
    lists = np.argsort(-scores, axis=1)[:, :5]
    gap = tf.calibration_gap(lists, histories, popularity)
    np.testing.assert_allclose(transform(h), h - (0.8 * 1.5 * gap)[:, None] * p, rtol=1e-5, atol=1e-6)
    assert (gap > 0).any() and (gap == 0).any()


def tiny_sae(k: int = 2) -> SAERuntime:
    """d = 2, three latents: x, y, and x + y - 1; decoder rows (1, 0), (0, 1), (0.5, 0.5)."""
    w_enc = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    w_dec = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    return SAERuntime(w_enc, np.array([0.0, 0.0, -1.0]), w_dec, np.zeros(2), k)


def test_popsteer_on_a_tiny_sae_by_hand() -> None:
    sae = tiny_sae()
    head = np.array([[2.0, 0.1], [3.0, 0.2], [2.5, 0.0]])
    tail = head[:, ::-1].copy()
    fit = tf.fit_popsteer(sae, head, tail)
    # Latent 0 (x) has head values 2, 3, 2.5 (sd 0.5) and tail values 0.1, 0.2, 0 (sd 0.1): pooled sd sqrt(0.13),
    # d = 2.4 / sqrt(0.13); latent 1 mirrors it; latent 2 (x + y - 1) is the same in both groups.
    d = 2.4 / math.sqrt(0.13)
    np.testing.assert_allclose(fit.d, [d, -d, 0.0], atol=1e-5)
    np.testing.assert_allclose(fit.sd, [0.5, 0.5, np.std([1.1, 2.2, 1.5], ddof=1)], atol=1e-6)
    # w = |d| / max|d| = 1, 1, 0; shift = -sign(d) w sd of the favoured group
    np.testing.assert_allclose(fit.shift, [-0.5, 0.5, 0.0], atol=1e-6)
    # h = (2, 1): pre-activations (2, 1, 2), top 2 = latents 0 and 2. At alpha 2: (1, 2, 2), top 2 = latents 1, 2:
    # latent 0 drops out, latent 1 enters; the served h is the new reconstruction 2 (0, 1) + 2 (0.5, 0.5) = (1, 3).
    h = np.array([[2.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    out = sae.shift_pre(h, fit.shift, np.array([2.0, 0.0]))
    np.testing.assert_allclose(out.h, [[1.0, 3.0], [0.5, 0.5]], atol=1e-6)
    np.testing.assert_allclose(out.z[0], [2.0, 0.0, 2.0])
    np.testing.assert_allclose(out.z_new[0], [0.0, 2.0, 2.0])
    # keeping the error term: h + x_hat(z') - x_hat(z) = (2, 1) + (1, 3) - (3, 1)
    np.testing.assert_allclose(sae.shift_pre(h[:1], fit.shift, 2.0, keep_error=True).h, [[0.0, 3.0]], atol=1e-6)
    policy = fit_popsteer_policy(sae, head, tail, alpha=2.0)
    applied = apply_policy(policy, h[:1], sae=sae)
    np.testing.assert_allclose(applied.h, [[1.0, 3.0]], atol=1e-6)
    assert applied.detail == {"entered": [[1]], "dropped": [[0]]}
    assert [e["latent"] for e in policy.fit["latents"]][:2] == [0, 1]


def test_synthetic_profiles_keep_lengths_and_pools() -> None:
    histories = [np.arange(5), np.arange(2), np.arange(40)]
    head, tail = np.array([1, 2, 3, 4, 5, 6]), np.array([10, 11, 12])
    popular, unpopular = tf.synthetic_profiles(histories, head, tail)
    assert [len(p) for p in popular] == [len(p) for p in unpopular] == [5, 2, 40]
    assert all(np.isin(p, head).all() for p in popular) and all(np.isin(p, tail).all() for p in unpopular)
    assert len(set(popular[0].tolist())) == 5  # distinct while the pool allows


def stats_of(n_latents: int) -> LatentStats:
    ones = torch.ones(n_latents)
    deciles = torch.linspace(0.1, 0.9, 9)
    return LatentStats(ones * 0.5, ones, ones * 3.0, ones, deciles.repeat(n_latents, 1), deciles, 100)


def test_edit_weights_scale_each_change() -> None:
    sae = tiny_sae()
    sae = SAERuntime(sae.w_enc, sae.b_enc, sae.w_dec, sae.b_dec, sae.k, stats_of(3))
    h = np.array([[2.0, 1.0]], dtype=np.float32)
    edits = [Edit(0, "pin", 5.0), Edit(2, "nudge", 1.0)]
    full = sae.steer(h, [edits])
    assert np.array_equal(sae.steer(h, [edits], weights_per_row=[[1.0, 1.0]]).h, full.h)
    assert np.array_equal(sae.steer(h, [edits], weights_per_row=[[0.0, 0.0]]).h, h)
    half = sae.steer(h, [edits], weights_per_row=[[0.5, 0.5]])
    np.testing.assert_allclose(half.z_new[0], [2 + 0.5 * (5 - 2), 0.0, 2.5])
    np.testing.assert_allclose(half.h - h, (full.h - h) / 2, atol=1e-6)


def test_direction_loadings_name_the_decoder_rows() -> None:
    rng = np.random.default_rng(8)
    w_dec = rng.normal(size=(40, 64))
    direction = w_dec[7] / np.linalg.norm(w_dec[7]) + 0.6 * w_dec[3] / np.linalg.norm(w_dec[3])
    report = tf.direction_loadings(direction, w_dec, {7: "drama-7"}, top=3, span_rows=2)[0]
    assert report.loads_on[0].latent == 7 and report.loads_on[0].concept == "drama-7"
    assert report.loads_on[0].cosine > 0.8 and report.loads_on[1].latent == 3
    assert report.span_share == pytest.approx(1.0, abs=1e-6)  # it lies in the span of rows 7 and 3
    assert tf.direction_loadings(direction, w_dec, top=3, span_rows=1)[0].span_share < 1.0


def fitted_documents() -> dict[str, tuple[dict, int, int]]:
    h, z = gendered(600, 9)
    rng = np.random.default_rng(10)
    emb, popularity = rng.normal(size=(120, 6)), rng.integers(0, 50, 120)
    sae = SAERuntime(rng.normal(size=(6, 20)), rng.normal(size=20), rng.normal(size=(20, 6)), np.zeros(6), 4)
    policies = {
        "erase": fit_erase(h, z, "inlp", 2, "midpoint", 0.7),
        "spectral": fit_spectral_policy(h, emb, 0.4),
        "calibrated": fit_calibrated(h, emb, popularity, 1.2, 7),
        "popsteer": fit_popsteer_policy(sae, h[z], h[~z], 1.5, keep_error=True),
    }
    return {
        kind: (json.loads(json.dumps(policy_document(with_report(p, sae.w_dec), kind, "t", "d", MADE_FOR))), p)
        for kind, p in policies.items()
    }


def test_fitted_policies_round_trip_through_json() -> None:
    for kind, (doc, policy) in fitted_documents().items():
        parsed = parse_policy(doc, 6, 20)
        assert parsed.kind == kind and parsed.strength == policy.strength and parsed.options == policy.options
        for name, values in policy.arrays.items():
            assert parsed.arrays[name].dtype == np.float32
            np.testing.assert_array_equal(parsed.arrays[name], values)  # bit for bit
        assert parsed.fit["directions" if kind != "popsteer" else "latents"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda doc: doc.pop("made_for"), "must record 'made_for'"),
        (lambda doc: doc.update(kind="erasee"), "unknown kind 'erasee'"),
        (lambda doc: doc.update(strength=float("nan")), "'strength' must be a finite number"),
        (lambda doc: doc["arrays"]["a"].update(dtype="float64"), "array 'a' has dtype 'float64'"),
        (lambda doc: doc["arrays"]["a"]["data"].__setitem__(3, float("inf")), "array 'a' holds values that are not"),
        (lambda doc: doc["arrays"]["a"]["data"].pop(), "array 'a' must list 12 numbers"),
        (lambda doc: doc["arrays"]["b"].update(shape=[1, 6]), r"array 'b' has shape \(1, 6\), but r is 2"),
        (lambda doc: doc["arrays"].pop("anchor"), "needs 'arrays'"),
        (lambda doc: doc.update(options={"list_k": 5}), "may hold nothing"),
    ],
)
def test_bad_fitted_policies_are_refused_naming_the_problem(change, needle: str) -> None:
    doc = fitted_documents()["erase"][0]
    change(doc)
    with pytest.raises(ConfigError, match=needle):
        parse_policy(doc, 6, 20)


def test_a_policy_fit_for_another_width_or_sae_is_refused() -> None:
    docs = fitted_documents()
    with pytest.raises(ConfigError, match=r"array 'a' has shape \(2, 6\), but d is 8"):
        parse_policy(docs["erase"][0], 8, 20)
    with pytest.raises(ConfigError, match=r"array 'shift' has shape \(20,\), but L is 32"):
        parse_policy(docs["popsteer"][0], 6, 32)
    doc = docs["calibrated"][0]
    doc["options"]["list_k"] = 0
    with pytest.raises(ConfigError, match=r"option 'list_k' must be an integer in \[1, 1000\], got 0"):
        parse_policy(doc, 6, 20)


def test_bundled_policies_round_trip_and_a_mismatch_is_refused(fitted_bundle: Path, ml100k: Dataset) -> None:
    """Written as `recsae debias` writes policies, bundled by write_bundle, loaded by load_bundle and
    the service's Catalog: the arrays are those a fit on the bundle's own data gives, bit for bit; a copy recorded
    as made for another dataset, SAE or width of h is refused, naming the policy and the problem."""
    bundle = load_bundle(fitted_bundle)
    sae = SAERuntime.load(bundle.sae_folder)
    catalog = Catalog(bundle, sae.stats, sae.n_latents, EditBounds())
    h = bundle_h(bundle.model_path, bundle.inputs, bundle.user_inputs)
    known, female = gender(ml100k)
    refit = fit_erase(h[known], female[known], "leace", 1, "midpoint", 1.0)
    loaded = catalog.policy("erase-gender").fitted
    assert loaded.kind == "erase" and loaded.strength == 1.0
    for name in ("a", "b", "anchor"):
        np.testing.assert_array_equal(loaded.arrays[name], refit.arrays[name])
    loads_on = loaded.fit["directions"][0]["loads_on"]
    assert loads_on[0]["concept"] == catalog.latent_name.get(loads_on[0]["latent"])
    good = bundle.policies["erase-gender"]
    other_data = {**good, "made_for": {**good["made_for"], "dataset": "ml-1m"}}
    wider = json.loads(json.dumps(good))
    wider["arrays"]["anchor"] = {"dtype": "float32", "shape": [bundle.d + 1], "data": [0.0] * (bundle.d + 1)}
    mixed = replace(bundle, policies={"other-data": other_data, "wider": wider})
    mixed_catalog = Catalog(mixed, sae.stats, sae.n_latents, EditBounds())
    for name, needle in (("other-data", "made for dataset ml-1m, but this bundle has ml-100k"),
                         ("wider", f"array 'anchor' has shape ({bundle.d + 1},), but d is {bundle.d}"),
                         ("erase-other-sae", "made for sae 0000000000000000")):  # fmt: skip
        target = catalog if name == "erase-other-sae" else mixed_catalog
        with pytest.raises(RequestError) as err:
            target.policy(name)
        assert err.value.status == 422 and f"policy '{name}' cannot be used with this bundle" in err.value.message
        assert needle in err.value.message
