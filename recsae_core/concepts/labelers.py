"""Labelers: a latent's describing samples -> a name, a one-sentence description and the terms behind it.

- Metadata (TF-IDF) labeler, the default: every sample becomes a sparse vector of metadata terms (genres, release
  decades and popularity bands of its recent items and of the model's top-1 item, and the user's gender / age band /
  occupation); a latent's terms are those over-represented in its describing samples against a background sample,
  weighted tf x log(lift) (TF-IDF with the background as the corpus). Its simulator scores any sample by the summed
  log-lift of the label's terms present in it.

The language-model labeler is `recsae_core.concepts.llm_labeler`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from recsae_core.concepts.samples import prefix_index
from recsae_core.concepts.scoring import best_threshold
from recsae_core.data.datasets import Dataset
from recsae_core.data.splits import Split

POP_BANDS = ("popular", "mid-popular", "niche")
AGE_BANDS = ((18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)  # fmt: skip


def age_band(age: str) -> str:
    """ML-1M age codes and ML-100K raw ages -> the ML-1M bands ('25-34')."""
    try:
        value = float(age)
    except ValueError:
        return age.strip()
    return next((label for bound, label in AGE_BANDS if value < bound), "56+")


def occupation_name(code: str) -> str:
    """ML-1M numeric occupation codes -> names; names pass through."""
    try:
        index = int(float(code))
    except ValueError:
        return code.strip()
    return ML1M_OCCUPATIONS[index] if 0 <= index < len(ML1M_OCCUPATIONS) else code


def popularity_bands(popularity: np.ndarray) -> np.ndarray:
    """0 popular / 1 mid-popular / 2 niche: items holding the first, second and last third of interactions."""
    order = np.lexsort((np.arange(len(popularity)), -popularity))
    counts = popularity[order].astype(np.float64)
    start = (np.cumsum(counts) - counts) / max(counts.sum(), 1)  # share of interactions held by more popular items
    bands = np.empty(len(popularity), dtype=np.int64)
    bands[order] = np.minimum((start * 3).astype(np.int64), 2)
    return bands


def _onehot(values: list[str], prefix: str) -> tuple[sp.csr_matrix, list[str]]:
    names = sorted({v for v in values if v})
    index = {v: i for i, v in enumerate(names)}
    rows = [r for r, v in enumerate(values) if v]
    cols = [index[values[r]] for r in rows]
    matrix = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(values), len(names)))
    return matrix, [f"{prefix}:{v}" for v in names]


def _rows(matrix: sp.csr_matrix, index: np.ndarray) -> sp.csr_matrix:
    return matrix[index] if matrix.shape[1] else sp.csr_matrix((len(index), 0))


@dataclass
class TermSpace:
    """The metadata vocabulary of a run and the per-item / per-user term matrices.

    A sample's terms, by group (key prefix): recent items (share of the last `recent` items with each item term:
    'genre:Horror', 'decade:1980s', 'pop:niche'), the most recent item ('last genre:Horror', 'last item:Alien
    (1979)'), the model's top-1 item ('next genre:Horror', 'next item:...'), the history length ('history:5-19
    items') and the user ('gender:female', 'age:25-34', 'occupation:writer')."""

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

    @classmethod
    def build(cls, data: Dataset, split: Split) -> TermSpace:
        popularity = split.item_popularity()
        meta = data.item_meta
        genre_names = sorted({g for gs in meta.genres for g in gs})
        gindex = {g: i for i, g in enumerate(genre_names)}
        rows = [i for i, gs in enumerate(meta.genres) for _ in gs]
        cols = [gindex[g] for gs in meta.genres for g in gs]
        blocks = [sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(data.n_items, len(genre_names)))]
        names = [f"genre:{g}" for g in genre_names]
        decades = [f"{y // 10 * 10}s" if y > 0 else "" for y in meta.years]
        for values, prefix in ((decades, "decade"), ([POP_BANDS[b] for b in popularity_bands(popularity)], "pop")):
            matrix, keys = _onehot(values, prefix)
            blocks.append(matrix)
            names += keys
        user_blocks, user_names = [], []
        if data.user_meta is not None:
            um = data.user_meta
            gender = [{"F": "female", "M": "male"}.get(g.upper(), g.lower()) for g in um.gender]
            for values, prefix in (
                (gender, "gender"),
                ([age_band(a) if a else "" for a in um.age], "age"),
                ([occupation_name(o) if o else "" for o in um.occupation], "occupation"),
            ):
                matrix, keys = _onehot(values, prefix)
                user_blocks.append(matrix)
                user_names += keys
        users = sp.hstack(user_blocks).tocsr() if user_blocks else sp.csr_matrix((data.n_users, 0))
        ranks = np.argsort(np.argsort(popularity, kind="stable"), kind="stable")
        titles = [
            f"{t} ({y})" if y > 0 and f"({y})" not in t else t for t, y in zip(meta.titles, meta.years, strict=True)
        ]
        return cls(
            item_terms=names,
            item_names=[f"item:{t}" for t in titles],
            user_terms=user_names,
            items=sp.hstack(blocks).tocsr(),
            users=users,
            popularity_percentile=ranks / max(len(popularity) - 1, 1),
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
    """'next genre:Horror' -> 'Horror', 'age:25-34' -> 'age 25-34', 'last item:Alien (1979)' -> 'Alien (1979)'."""
    kind, _, value = term.removeprefix("next ").removeprefix("last ").partition(":")
    return f"age {value}" if kind == "age" else value


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


def make_tfidf_label(terms: list[Term]) -> TfidfLabel:
    """Name from the two strongest distinct category words (genre, decade, popularity, history length, user group),
    completed with an item title when there are fewer; and a one-sentence description."""
    words: list[str] = []
    by_kind = sorted(terms, key=lambda t: t.term.split(":")[0].endswith("item"))  # stable: categories first
    for t in by_kind:
        word = _word(t.term)
        if word and word not in words:
            words.append(word)
    name = "-".join(words[:2]) or "unlabelled"
    longer = tuple("-".join(words[:n]) for n in range(3, min(len(words), 4) + 1))
    return TfidfLabel(name, describe_terms([t.term for t in terms]), terms, longer)


def _join(values: list[str], word: str = "and") -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + f" {word} " + values[-1]


def _phrase(keys: list[str], prefix: str) -> str:
    """'niche Horror titles from the 1980s (e.g. Alien (1979))' for one group of terms; '' if none."""

    def pick(kind: str) -> list[str]:
        return [display(k) for k in keys if k.startswith(f"{prefix}{kind}:")]

    genres, decades, pops, items = pick("genre"), pick("decade"), pick("pop"), pick("item")
    kinds = [_join(pops, "or") if pops else "", _join(genres, "or") if genres else ""]
    what = " ".join(filter(None, kinds))
    era = f" from the {_join(decades, 'or')}" if decades else ""
    if not what and not era:
        return _join(items[:2], "or") if items else ""
    example = f" (e.g. {_join(items[:2])})" if items else ""
    return f"{what or 'titles'}{' titles' if what else ''}{era}{example}"


def describe_terms(keys: list[str]) -> str:
    """One readable sentence from term keys, e.g. 'After niche Horror titles from the 1980s (e.g. Alien (1979)), the
    model recommends Horror titles next; users skew female.'"""
    last, recent, after = _phrase(keys, "last "), _phrase(keys, ""), _phrase(keys, "next ")
    before = " and ".join(filter(None, [f"after {last}" if last else "", f"with recent items mostly {recent}"
                                                                                if recent else ""]))  # fmt: skip
    if after:
        sentence = f"{before}, the model recommends {after} next" if before else f"the model recommends {after} next"
    else:
        sentence = f"fires {before}" if before else ""
    extras = [f"histories of {_join([display(k) for k in keys if k.startswith('history:')], 'or')}"] if any(
        k.startswith("history:") for k in keys) else []  # fmt: skip
    people = [display(k) for k in keys if k.split(":")[0] in ("gender", "age", "occupation")]
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
