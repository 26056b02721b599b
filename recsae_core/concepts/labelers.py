"""Labelers: a latent's describing samples -> a name, a one-sentence description and the terms behind it.

- Metadata (TF-IDF) labeler, the default: every sample becomes a sparse vector of metadata terms (terms from the
  item table's columns, such as genres and release decades, and popularity bands, of its recent items and of the
  model's top-1 item; and the user table's attributes, such as gender / age band / occupation; see
  `recsae_core.concepts.metadata_terms`); a latent's terms are those over-represented in its describing samples
  against a background sample, weighted tf x log(lift) (TF-IDF with the background as the corpus). Its simulator
  scores any sample by the summed log-lift of the label's terms present in it.

The language-model labeler is `recsae_core.concepts.llm_labeler`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from recsae_core.concepts.metadata_terms import BAND_WORDS, Role, item_term_groups, user_term_groups
from recsae_core.concepts.samples import prefix_index
from recsae_core.concepts.scoring import best_threshold
from recsae_core.data.datasets import Dataset
from recsae_core.data.splits import Split

MOVIELENS_KINDS: dict[str, Role] = {"genre": "category", "decade": "era", "pop": "pop", "gender": "user",
                                     "age": "user", "occupation": "user"}  # fmt: skip
"""The term kinds of the MovieLens vocabulary: names and descriptions read them as they always have."""


def _rows(matrix: sp.csr_matrix, index: np.ndarray) -> sp.csr_matrix:
    return matrix[index] if matrix.shape[1] else sp.csr_matrix((len(index), 0))


@dataclass
class TermSpace:
    """The metadata vocabulary of a run and the per-item / per-user term matrices, built from whatever columns its
    item and user tables have (`recsae_core.concepts.metadata_terms`).

    A sample's terms, by group (key prefix): recent items (share of the last `recent` items with each item term:
    'genre:Horror', 'decade:1980s', 'pop:niche', '<column>:<value>'), the most recent item ('last genre:Horror',
    'last item:Alien (1979)'), the model's top-1 item ('next genre:Horror', 'next item:...'), the history length
    ('history:5-19 items') and the user ('gender:female', 'age:25-34', 'occupation:writer', '<column>:<value>')."""

    item_terms: list[str]
    """Item term keys ('genre:Horror', 'decade:1980s', 'pop:niche')."""
    item_names: list[str]
    """Item identity keys ('item:Alien (1979)'), in item order."""
    user_terms: list[str]
    """User term keys ('gender:female', 'age:25-34', 'occupation:writer')."""
    items: sp.csr_matrix
    """(n_items, len(item_terms)) 0/1."""
    users: sp.csr_matrix
    """(n_users, len(user_terms)) 0/1."""
    popularity_percentile: np.ndarray
    """(n_items,) share of items less popular than each item (1 = most popular)."""
    kinds: dict[str, Role] = field(default_factory=lambda: dict(MOVIELENS_KINDS))
    """Term kind (key prefix) -> what its terms say, for names and descriptions; user kinds in column order."""

    @property
    def terms(self) -> list[str]:
        """Sample term keys, in the column order of `sample_matrix`."""
        it = self.item_terms
        return [*it, *("last " + t for t in it), *("next " + t for t in it), *HISTORY_BANDS_KEYS, *self.user_terms,
                *("last " + t for t in self.item_names), *("next " + t for t in self.item_names)]  # fmt: skip

    @property
    def user_offset(self) -> int:
        """Column of the first user term in `sample_matrix`."""
        return 3 * len(self.item_terms) + len(HISTORY_BANDS_KEYS)

    @property
    def user_kinds(self) -> list[str]:
        """The user attribute kinds ('gender', 'age', 'occupation', '<column>'), in column order."""
        return [kind for kind, role in self.kinds.items() if role == "user"]

    @classmethod
    def build(cls, data: Dataset, split: Split) -> TermSpace:
        popularity = split.item_popularity()
        item_groups = item_term_groups(data, popularity)
        user_groups = user_term_groups(data, taken={g.kind for g in item_groups})
        users = (sp.hstack([g.matrix for g in user_groups]).tocsr() if user_groups
                 else sp.csr_matrix((data.n_users, 0)))  # fmt: skip
        ranks = np.argsort(np.argsort(popularity, kind="stable"), kind="stable")
        meta = data.item_meta
        titles = [
            f"{t} ({y})" if y > 0 and f"({y})" not in t else t for t, y in zip(meta.titles, meta.years, strict=True)
        ]
        return cls(
            item_terms=[k for g in item_groups for k in g.keys],
            item_names=[f"item:{t}" for t in titles],
            user_terms=[k for g in user_groups for k in g.keys],
            items=sp.hstack([g.matrix for g in item_groups]).tocsr(),
            users=users,
            popularity_percentile=ranks / max(len(popularity) - 1, 1),
            kinds={g.kind: g.role for g in (*item_groups, *user_groups)},
        )

    def sample_matrix(
        self, split: Split, users: np.ndarray, positions: np.ndarray, top1: np.ndarray, recent: int = 10
    ) -> sp.csr_matrix:
        """(n, len(terms)) term values of samples, built with sparse products (no loop over samples)."""
        n, n_items = len(users), self.items.shape[0]
        hist = prefix_index(split.train, users, positions, recent)
        rows = np.repeat(np.arange(n), hist.lengths)
        weights = np.repeat(1.0 / np.maximum(hist.lengths, 1), hist.lengths)
        history = sp.csr_matrix((weights, (rows, hist.values)), shape=(n, n_items))
        last = split.train.values[split.train.indptr[users] + positions]
        band = np.searchsorted(HISTORY_BANDS, positions + 1, side="right")
        ones = np.ones(n)
        blocks = [
            history @ self.items, self.items[last], self.items[top1],
            sp.csr_matrix((ones, (np.arange(n), band)), shape=(n, len(HISTORY_BANDS_KEYS))), _rows(self.users, users),
            sp.csr_matrix((ones, (np.arange(n), last)), shape=(n, n_items)),
            sp.csr_matrix((ones, (np.arange(n), top1)), shape=(n, n_items)),
        ]  # fmt: skip
        return sp.hstack(blocks).tocsr().astype(np.float32)


HISTORY_BANDS = (5, 20, 50)
HISTORY_BANDS_KEYS = ("history:under 5 items", "history:5-19 items", "history:20-49 items", "history:50+ items")


def display(term: str) -> str:
    """'next genre:Horror' -> 'Horror', 'age:25-34' -> 'age 25-34', 'last item:Alien (1979)' -> 'Alien (1979)';
    a band of another column reads with its name ('price:high' -> 'high price'), and so does a value without
    letters ('rating:4' -> 'rating 4')."""
    kind, _, value = term.removeprefix("next ").removeprefix("last ").partition(":")
    if kind == "age":
        return f"age {value}"
    if kind in MOVIELENS_KINDS or kind in ("item", "history"):
        return value
    words = kind.replace("_", " ")
    if value in BAND_WORDS:
        return f"{value} {words}"
    return value if re.search(r"[^\W\d_]", value) else f"{words} {value}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("'", "")).strip("-")


class Term(NamedTuple):
    """One label term with its statistics over the describing samples."""

    term: str
    """Term key ('next genre:Horror')."""
    share: float
    """Mean value over the describing samples (share of samples / of history items having it)."""
    background: float
    """Mean value over the background samples."""
    lift: float
    """share / background, smoothed towards 1 for few samples."""
    weight: float
    """tf x log(lift): how much the term defines the latent."""


class TfidfLabel(NamedTuple):
    """A metadata label."""

    name: str
    """Short readable name ('horror-1980s'); not yet made unique."""
    description: str
    """One sentence."""
    terms: list[Term]
    """The label's terms, strongest first; the simulator uses exactly these."""
    longer: tuple[str, ...] = ()
    """Longer names ('horror-1980s-female', ...) to use before a numeric suffix when the name is taken."""


def tfidf_terms(
    describe: sp.csr_matrix, background_mean: np.ndarray, n_background: int, keys: list[str], max_terms: int = 6,
    min_share: float = 0.1, smoothing: float = 2.0, min_lift: float = 1.1,
) -> tuple[list[Term], list[int]]:  # fmt: skip
    """Terms over-represented in the describing samples against the background, strongest (tf x log lift) first,
    with their column indices."""
    n = describe.shape[0]
    if n == 0:
        return [], []
    tf = np.asarray(describe.mean(axis=0)).ravel()
    bg = np.maximum(background_mean, 1.0 / max(n_background, 1))
    lift = (tf * n + smoothing * bg) / (n + smoothing) / bg
    weight = tf * np.log(np.maximum(lift, 1e-12))
    ok = (lift >= min_lift) & (tf >= min_share)
    order = [int(i) for i in np.argsort(-weight, kind="stable") if ok[i]][:max_terms]
    terms = [Term(keys[i], float(tf[i]), float(background_mean[i]), float(lift[i]), float(weight[i])) for i in order]
    return terms, order


def _word(term: str) -> str:
    """A term's contribution to a name: its display slug, item titles cut to two words without the year."""
    text = display(term)
    if term.split(":")[0].endswith("item"):
        text = " ".join(re.sub(r"\(\d{4}\)|,.*$", "", text).split()[:2])
    return slug(text)


def make_tfidf_label(terms: list[Term], kinds: Mapping[str, Role] | None = None) -> TfidfLabel:
    """Name from the two strongest distinct category words (genre, decade, popularity, history length, user group),
    completed with an item title when there are fewer; and a one-sentence description. `kinds`: the term space's
    (MovieLens kinds when not given)."""
    words: list[str] = []
    by_kind = sorted(terms, key=lambda t: t.term.split(":")[0].endswith("item"))  # stable: categories first
    for t in by_kind:
        word = _word(t.term)
        if word and word not in words:
            words.append(word)
    name = "-".join(words[:2]) or "unlabelled"
    longer = tuple("-".join(words[:n]) for n in range(3, min(len(words), 4) + 1))
    return TfidfLabel(name, describe_terms([t.term for t in terms], kinds), terms, longer)


def _join(values: list[str], word: str = "and") -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + f" {word} " + values[-1]


def _role(key: str, prefix: str, kinds: Mapping[str, Role]) -> str | None:
    """The role of a term key seen from one group ('' recent items, 'last ', 'next '); None outside the group."""
    if not key.startswith(prefix) or (not prefix and key.startswith(("last ", "next "))):
        return None
    kind = key.removeprefix(prefix).split(":")[0]
    return "item" if kind == "item" else kinds.get(kind)


def _phrase(keys: list[str], prefix: str, kinds: Mapping[str, Role]) -> str:
    """'niche Horror titles from the 1980s (e.g. Alien (1979))' for one group of terms; '' if none."""

    def pick(role: str) -> list[str]:
        return [display(k) for k in keys if _role(k, prefix, kinds) == role]

    categories, eras, pops, measures, items = (pick(r) for r in ("category", "era", "pop", "measure", "item"))
    what = " ".join(_join(v, "or") for v in (pops, categories) if v)
    era = f" from the {_join(eras, 'or')}" if eras else ""
    era += f" with {_join(measures, 'or')}" if measures else ""
    if not what and not era:
        return _join(items[:2], "or") if items else ""
    example = f" (e.g. {_join(items[:2])})" if items else ""
    return f"{what or 'titles'}{' titles' if what else ''}{era}{example}"


def _person(key: str) -> str:
    """A user term as it reads after 'users skew': 'female', 'age 25-34', 'plan premium', 'high income'."""
    kind, _, value = key.partition(":")
    if kind in MOVIELENS_KINDS or value in BAND_WORDS:
        return display(key)
    return f"{kind.replace('_', ' ')} {value}"


def describe_terms(keys: list[str], kinds: Mapping[str, Role] | None = None) -> str:
    """One readable sentence from term keys, e.g. 'After niche Horror titles from the 1980s (e.g. Alien (1979)), the
    model recommends Horror titles next; users skew female.' `kinds`: what each key prefix says (MovieLens kinds
    when not given)."""
    kinds = MOVIELENS_KINDS if kinds is None else kinds
    last, recent, after = (_phrase(keys, p, kinds) for p in ("last ", "", "next "))
    before = " and ".join(filter(None, [f"after {last}" if last else "", f"with recent items mostly {recent}"
                                                                                if recent else ""]))  # fmt: skip
    if after:
        sentence = f"{before}, the model recommends {after} next" if before else f"the model recommends {after} next"
    else:
        sentence = f"fires {before}" if before else ""
    extras = [f"histories of {_join([display(k) for k in keys if k.startswith('history:')], 'or')}"] if any(
        k.startswith("history:") for k in keys) else []  # fmt: skip
    people = [_person(k) for k in keys if _role(k, "", kinds) == "user"]
    if people:
        extras.append(f"users skew {_join(people)}")
    sentence = "; ".join(filter(None, [sentence, *extras]))
    if not sentence:
        return "No metadata term stands out against the background."
    return sentence[0].upper() + sentence[1:] + "."


class Simulator:
    """Scores samples by the summed log-lift of the label's terms they carry; `predict` thresholds the score at
    the value that best separates describing samples from background inactive ones (balanced accuracy)."""

    def __init__(self, columns: list[int], lifts: list[float], n_terms: int) -> None:
        self.weights = np.zeros(n_terms, dtype=np.float64)
        self.weights[np.asarray(columns, dtype=np.int64)] = np.log(np.maximum(np.asarray(lifts, dtype=float), 1e-12))
        self.threshold = np.inf

    def score(self, x: sp.csr_matrix) -> np.ndarray:
        return np.asarray(x @ self.weights).ravel()

    def calibrate(self, positives: sp.csr_matrix, negatives: sp.csr_matrix) -> float:
        self.threshold = best_threshold(self.score(positives), self.score(negatives))
        return self.threshold

    def predict(self, x: sp.csr_matrix) -> np.ndarray:
        return self.score(x) >= self.threshold
