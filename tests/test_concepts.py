"""Concept building blocks on constructed cases: level binning, sparse encoding, sample selection without leakage,
TF-IDF lift with a known answer, naming, the scoring protocols, coherence, and parsing model answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import roc_auc_score

from recsae_core.concepts.catalog import unique_names
from recsae_core.concepts.labelers import Simulator, Term, describe_terms, make_tfidf_label, tfidf_terms
from recsae_core.concepts.llm_client import yes_share
from recsae_core.concepts.llm_labeler import parse_explanation
from recsae_core.concepts.metadata_terms import age_band, occupation_name, popularity_bands
from recsae_core.concepts.samples import (
    SampleOptions,
    column_top_units,
    encode_sparse,
    latent_values,
    prefix_index,
    recommended_examples,
    select_samples,
    top_units,
)
from recsae_core.concepts.scoring import best_threshold, paper_confidence, roc_auc, score_latent, unit_coherence
from recsae_core.data.splits import Ragged
from recsae_core.sae.model import SAEConfig, TopKSAE
from recsae_core.sae.runtime import SAERuntime, activation_levels
from recsae_core.sae.stats import LatentStats

# ------------------------------------------------------------------------------------------------ levels


def test_levels_bin_by_global_deciles_of_latent_stats():
    cuts = np.arange(1, 10, dtype=np.float32)  # 1..9
    values = np.array([0.0, 0.5, 1.0, 1.5, 8.99, 9.0, 50.0], dtype=np.float32)
    expected = [0, 1, 2, 2, 9, 10, 10]  # a value on a cut point belongs to the level above it
    assert activation_levels(values, cuts).tolist() == expected
    assert activation_levels(values, cuts.astype(np.float64)).tolist() == expected  # as the catalog passes them
    n = 1
    stats = LatentStats(*(torch.zeros(n) for _ in range(4)), torch.zeros(n, 9), torch.from_numpy(cuts), 1)
    sae = TopKSAE(SAEConfig(d_in=4, n_latents=n, k=1), seed=0)
    assert SAERuntime.from_model(sae, stats).levels(values).tolist() == expected  # as the service bins them


def test_encode_sparse_matches_dense_encode():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=32, k=3), seed=1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.3, 0.1, 32))  # some rows get fewer than k positive pre-activations
    x = torch.randn(257, 8)
    codes = encode_sparse(SAERuntime.from_model(sae), x, batch_size=50)
    with torch.no_grad():
        dense = sae.encode(x).numpy()
    assert isinstance(codes, sp.csc_matrix) and codes.has_sorted_indices
    np.testing.assert_array_equal(codes.toarray() > 0, dense > 0)  # the same latents fire ...
    np.testing.assert_allclose(codes.toarray(), dense, rtol=1e-6, atol=1e-6)  # ... as strongly (fused matmul)
    ids = np.arange(0, 257, 7)
    np.testing.assert_allclose(latent_values(codes, 5, ids), dense[ids, 5], rtol=1e-6, atol=1e-6)


def test_prefix_index_gives_prefix_and_recent_items():
    train = Ragged.from_lists([np.array([10, 11, 12, 13]), np.array([20, 21])])
    full = prefix_index(train, np.array([0, 1, 0]), np.array([2, 1, 0]))
    assert [full.row(i).tolist() for i in range(3)] == [[10, 11, 12], [20, 21], [10]]
    recent = prefix_index(train, np.array([0, 1]), np.array([3, 1]), recent=2)
    assert [recent.row(i).tolist() for i in range(2)] == [[12, 13], [20, 21]]


# ------------------------------------------------------------------------------------------------ samples


@pytest.fixture(scope="module")
def toy_codes():
    """600 samples of 60 users (10 positions each); latent 0 fires on 40 users, latent 1 on 3, latent 2 never."""
    rng = np.random.default_rng(0)
    n, users = 600, np.repeat(np.arange(60), 10)
    dense = np.zeros((n, 3), dtype=np.float32)
    active = users < 40
    dense[active, 0] = rng.uniform(0.1, 5.0, active.sum())
    few = np.flatnonzero(users < 3)
    dense[few[::2], 1] = rng.uniform(0.1, 2.0, len(few[::2]))
    return sp.csc_matrix(dense), users, dense


def test_sample_selection_never_leaks(toy_codes):
    codes, users, dense = toy_codes
    options = SampleOptions(n_paper=5, n_describe=12, n_detect=8, n_background=120, n_calibrate=30, seed=3)
    chosen, background = select_samples(codes, users, options, np.array([0, 1]))
    in_bg = np.isin(np.arange(len(users)), background)
    for s in chosen:
        held_pos = np.concatenate([s.paper_pos, s.detect_pos])
        held_neg = np.concatenate([s.paper_neg, s.detect_neg])
        held = np.concatenate([held_pos, held_neg])
        assert not set(s.describe) & set(held), "a describing sample is also held out"
        assert not set(users[s.describe]) & set(users[held]), "a describing user is also held out"
        assert len(set(held)) == len(held)
        assert (dense[s.describe, s.latent] > 0).all() and (dense[held_pos, s.latent] > 0).all()
        assert (dense[held_neg, s.latent] == 0).all() and (dense[s.calibrate_neg, s.latent] == 0).all()
        assert not in_bg[held].any(), "held-out samples come from the background set"
        assert in_bg[s.calibrate_neg].all()
        assert len(set(users[s.describe])) == len(s.describe), "describing samples are one per user"
    big = chosen[0]
    assert len(big.describe) == 12 and len(big.paper_pos) == 5 and len(big.detect_pos) == 8
    assert len(big.paper_neg) == 5 and len(big.detect_neg) == 8 and len(big.calibrate_neg) == 30
    # The paper band interleaves the top users: both halves beat every other user's best sample.
    best = np.array([dense[users == u, 0].max() for u in range(40)])
    band = np.concatenate([big.describe[:5], big.paper_pos])
    assert set(np.round(dense[band, 0], 6)) == set(np.round(np.sort(best)[-10:], 6))
    assert dense[big.describe[0], 0] == best.max()
    # A latent with 3 users still gets describing and held-out samples from different users.
    small = chosen[1]
    assert len(small.describe) >= 1 and len(small.paper_pos) >= 1
    # Same seed, same selection.
    again, _ = select_samples(codes, users, options, np.array([0, 1]))
    for first, second in zip(chosen, again, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(first[1:], second[1:], strict=True))


def test_top_units_one_per_user(toy_codes):
    codes, users, dense = toy_codes
    top = column_top_units(codes, users, 0, 6)
    assert len(set(users[top])) == 6 and (np.diff(dense[top, 0]) <= 0).all()
    np.testing.assert_array_equal(top_units(dense[:, 0], users, 6), top)
    assert len(column_top_units(codes, users, 2, 6)) == 0


def test_recommended_examples_most_frequent_first():
    titles = ["a", "b", "c"]
    assert recommended_examples(np.array([2, 1, 1, 0, 2, 1]), titles, 2) == ["b", "c"]


# ------------------------------------------------------------------------------------------------ labels


def test_tfidf_lift_known_answer():
    """40 describing samples: term 0 in 80% (background 10%), term 1 in 50% (background 50%), term 2 in 30%
    (background 1%), term 3 in 2.5% (background 0.1%, below min_share). Expected: terms 0 then 2."""
    n = 40
    describe = np.zeros((n, 4))
    describe[:32, 0] = 1
    describe[:20, 1] = 1
    describe[:12, 2] = 1
    describe[0, 3] = 1
    background = np.array([0.1, 0.5, 0.01, 0.001])
    terms, cols = tfidf_terms(sp.csr_matrix(describe), background, 1000, ["a", "b", "c", "d"], 6, 0.05, 2.0)
    assert cols == [0, 2] and [t.term for t in terms] == ["a", "c"]
    lift_a = (0.8 * n + 2 * 0.1) / (n + 2) / 0.1
    lift_c = (0.3 * n + 2 * 0.01) / (n + 2) / 0.01
    assert terms[0].lift == pytest.approx(lift_a) and terms[1].lift == pytest.approx(lift_c)
    assert terms[0].weight == pytest.approx(0.8 * np.log(lift_a))
    assert terms[0].share == pytest.approx(0.8) and terms[0].background == pytest.approx(0.1)


def test_label_name_and_description():
    terms = [
        Term("next genre:Horror", 0.9, 0.05, 15.0, 2.4),
        Term("last item:Alien (1979)", 0.3, 0.001, 200.0, 1.5),
        Term("last decade:1980s", 0.7, 0.2, 3.0, 0.7),
        Term("gender:female", 0.6, 0.3, 2.0, 0.4),
    ]
    label = make_tfidf_label(terms)
    assert label.name == "horror-1980s"  # category words first, titles only to complete a name
    assert label.longer == ("horror-1980s-female", "horror-1980s-female-alien")
    assert label.description == (
        "After titles from the 1980s (e.g. Alien (1979)), the model recommends Horror titles next; users skew female."
    )
    assert make_tfidf_label([Term("next item:Star Wars (1977)", 0.5, 0.01, 40, 2)]).name == "star-wars"
    assert make_tfidf_label([]).name == "unlabelled"
    assert describe_terms([]) == "No metadata term stands out against the background."


def test_unique_names_suffix_on_collision():
    assert unique_names(["drama", "horror", "Drama", "drama", "drama-2"]) == [
        "drama", "horror", "Drama-2", "drama-3", "drama-2-2",
    ]  # fmt: skip
    longer = [(), ("drama-1990s", "drama-1990s-female"), ("drama-1990s", "drama-1990s-female"), ("drama-1990s",)]
    assert unique_names(["drama"] * 4, longer) == ["drama", "drama-1990s", "drama-1990s-female", "drama-2"]


def test_metadata_helpers():
    assert [age_band(a) for a in ("1", "18", "24", "25", "56", "73", "x")] == [
        "under 18", "18-24", "18-24", "25-34", "56+", "56+", "x",
    ]  # fmt: skip
    assert occupation_name("12") == "programmer" and occupation_name("writer") == "writer"
    bands = popularity_bands(np.array([100, 1, 50, 30, 10, 5, 4]))
    assert bands[0] == 0 and bands[1] == 2 and set(bands.tolist()) == {0, 1, 2}


def test_simulator_uses_label_terms_and_calibrates_on_describing_side():
    sim = Simulator([0, 2], [np.e, np.e**2], n_terms=3)  # weights 1 and 2
    x = sp.csr_matrix(np.array([[1, 5, 0], [0, 5, 1], [1, 0, 1], [0, 9, 0]], dtype=float))
    np.testing.assert_allclose(sim.score(x), [1, 2, 3, 0])  # term 1 is not in the label: ignored
    threshold = sim.calibrate(x[[1, 2]], x[[0, 3]])
    assert 1 < threshold <= 2 and sim.predict(x).tolist() == [False, True, True, False]


# ------------------------------------------------------------------------------------------------ scoring


def test_roc_auc_matches_sklearn_and_handles_ties():
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5 and roc_auc([], [1]) is None
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 30).astype(float), rng.integers(0, 4, 25).astype(float)
    expected = roc_auc_score(np.r_[np.ones(30), np.zeros(25)], np.r_[pos, neg])
    assert roc_auc(pos, neg) == pytest.approx(expected)


def test_paper_protocol_confidence_is_accuracy():
    assert paper_confidence([True] * 5, [False] * 5) == 1.0
    assert paper_confidence([True, True, True, False, False], [False, False, False, False, True]) == 0.7
    assert paper_confidence([], [False]) is None
    scores = score_latent(np.array([3.0, 2, 1, 0.5, 4]), np.array([0.0, 0, 1.5, 0, 0]), np.array([1.0]),
                          np.array([0.0]), threshold=1.0)  # fmt: skip
    assert scores.confidence == 0.8 and scores.auc == 1.0 and scores.n_paper == (5, 5)


def test_best_threshold_maximises_balanced_accuracy():
    t = best_threshold(np.array([2.0, 3.0, 4.0]), np.array([0.0, 0.5, 1.0, 2.5]))
    assert t == 1.5  # all positives, 3 of 4 negatives right; above 2.5 only 2 of 3 positives would be
    assert best_threshold(np.array([2.0, 3.0, 4.0]), np.array([0.0, 1.0, 2.5])) == 2.75  # a tie: the higher one
    assert best_threshold(np.array([]), np.array([1.0])) == float("inf")
    assert best_threshold(np.array([5.0]), np.array([])) == 5.0


def test_coherence_ignores_pairs_with_the_same_top1():
    h = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert unit_coherence(h, np.array([7, 7, 8])) == pytest.approx(0.0)  # only the two orthogonal pairs count
    assert unit_coherence(h, np.array([7, 8, 8])) == pytest.approx(0.5)  # (1 + 0) / 2
    assert unit_coherence(h, np.array([7, 7, 7])) is None and unit_coherence(h[:1], np.array([1])) is None


# ------------------------------------------------------------------------------------------------ model answers


def test_parse_explanation_is_tolerant():
    name, text = parse_explanation("Name: Sci-Fi Classics!\nExplanation: the main thing this neuron does is find x")
    assert name == "sci-fi-classics" and text == "the main thing this neuron does is find x."
    assert parse_explanation("users who like westerns.") == ("", "users who like westerns.")
    assert parse_explanation("") == ("", "")


def test_yes_share_reads_first_token_logprobs():
    def answer(options, content="Yes"):
        first = {"token": content, "logprob": -0.1, "top_logprobs": options}
        return {"choices": [{"message": {"content": content}, "logprobs": {"content": [first]}}]}

    top = [{"token": "Yes", "logprob": np.log(0.6)}, {"token": " yes", "logprob": np.log(0.1)},
           {"token": "No", "logprob": np.log(0.2)}, {"token": "Maybe", "logprob": np.log(0.1)}]  # fmt: skip
    assert yes_share(answer(top)) == pytest.approx(0.7 / 0.9)
    assert yes_share({"choices": [{"message": {"content": "No."}}]}) == 0.0
    assert yes_share({"choices": [{"message": {"content": "Perhaps"}}]}) == 0.5
