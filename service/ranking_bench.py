"""The engine's rank step against catalogue size: `python -m service.ranking_bench [--out FILE]` prints (and saves)
JSON of the median and p99 milliseconds per request at 10k, 100k and 1M items, for the blocked exact top-k the engine
runs (recsae_core.recommenders.ranking) and, measured in the same run on the same data, two baselines: a full
stable sort of the score matrix, and the engine's previous rank step (the full matrix, argpartition, lexsort of the
candidates). Also the peak memory of one call (tracemalloc), and whether every method served the same items.

A synthetic catalogue from a seed (float32 normal, d = 64), nothing read from disk; one BLAS thread, as in a
one-CPU replica. `rank_bench` is the function `recsae bench scale` can call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from recsae_core.common.artifacts import write_json
from recsae_core.recommenders.ranking import ItemScorer, Masked, count_above, top_k

SIZES = (10_000, 100_000, 1_000_000)
BATCHES = (1, 16)


def _full_scores(scorer: ItemScorer, h: np.ndarray, masked: Masked) -> np.ndarray:
    scores = h @ scorer.emb_t
    scores[masked.rows, masked.items] = -np.inf
    return scores


def _full_sort(scorer: ItemScorer, h: np.ndarray, k: int, masked: Masked) -> np.ndarray:
    return np.argsort(-_full_scores(scorer, h, masked), axis=1, kind="stable")[:, :k]


def _previous_engine(scorer: ItemScorer, h: np.ndarray, k: int, masked: Masked) -> np.ndarray:
    """The engine's rank step before blocks (service/engine.py at c6de28e, `_top`)."""
    scores = _full_scores(scorer, h, masked)
    candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, candidates, axis=1)
    return np.stack([c[np.lexsort((c, -v))] for c, v in zip(candidates, values, strict=True)])


def _blocked(scorer: ItemScorer, h: np.ndarray, k: int, masked: Masked) -> np.ndarray:
    return top_k(scorer, h, k, masked).items


def _blocked_steered(scorer: ItemScorer, h: np.ndarray, k: int, masked: Masked) -> np.ndarray:
    """A steered row's rank step: its top k (here from the same h), then each served item's unsteered rank."""
    items = top_k(scorer, h, k, masked).items
    count_above(scorer, h, list(items), masked)
    return items


METHODS: dict[str, Callable[[ItemScorer, np.ndarray, int, Masked], np.ndarray]] = {
    "blocked": _blocked,
    "blocked_steered": _blocked_steered,
    "previous_engine": _previous_engine,
    "full_sort": _full_sort,
}
"""What is timed: the engine's rank step (plain, and with the unsteered ranks a steered row also gets), and the two
baselines."""


def rank_bench(
    sizes: Sequence[int] = SIZES, batches: Sequence[int] = BATCHES, repeats: int = 15, k: int = 10,
    seen: int = 100, d: int = 64, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Per catalogue size and batch size: median and p99 ms per request (a batch's time over its rows) of each of
    METHODS over `repeats` timed calls after one warm-up, peak MB per request of one call, and the ratios of the
    baselines to the blocked step. Every row has `seen` random items masked."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__}
    methods = {
        "blocked": "the engine's rank step (top_k)",
        "blocked_steered": "top_k + count_above",
        "previous_engine": "full matrix + argpartition + lexsort",
        "full_sort": "full stable argsort",
    }
    points = []
    with threadpool_limits(limits=1):
        for n_items in sizes:
            scorer = ItemScorer(np.ascontiguousarray(rng.standard_normal((d, n_items), dtype=np.float32)))
            for batch in batches:
                h = rng.standard_normal((batch, d), dtype=np.float32)
                masked = Masked(np.repeat(np.arange(batch), seen), rng.integers(0, n_items, batch * seen))
                points.append({"n_items": n_items, "batch": batch, **_point(scorer, h, k, masked, repeats)})
                print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    by = {(p["n_items"], p["batch"]): p["p50_ms"]["blocked"] for p in points}
    growth = {f"batch_{b}": {f"{n}_over_{m}": round(by[(n, b)] / by[(m, b)], 3) for m, n in pairwise(sizes)}
              for b in batches}  # fmt: skip
    return {"machine": machine, "d": d, "k": k, "seen_per_row": seen, "repeats": repeats, "seed": seed,
            "blas_threads": 1, "methods": methods, "serve": points, "blocked_growth": growth}  # fmt: skip


def _point(scorer: ItemScorer, h: np.ndarray, k: int, masked: Masked, repeats: int) -> dict[str, Any]:
    batch = len(h)
    out: dict[str, Any] = {"p50_ms": {}, "p99_ms": {}, "peak_mb": {}}
    answers = {}
    for name, method in METHODS.items():
        answers[name] = method(scorer, h, k, masked)  # a warm-up, and the answer compared below
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            method(scorer, h, k, masked)
            times.append((time.perf_counter() - t0) * 1000 / batch)
        out["p50_ms"][name] = round(statistics.median(times), 4)
        out["p99_ms"][name] = round(float(np.percentile(times, 99)), 4)
        peak = _peak_bytes(method, scorer, h, k, masked)
        out["peak_mb"][name] = round(peak / batch / 2**20, 3)
    out["same_items"] = all(np.array_equal(a, answers["full_sort"]) for a in answers.values())
    out["ratio"] = {name: round(out["p50_ms"][name] / out["p50_ms"]["blocked"], 3)
                    for name in ("previous_engine", "full_sort")}  # fmt: skip
    return out


def _peak_bytes(method: Callable[..., Any], *args: Any) -> int:
    """Peak bytes numpy allocated during one call (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        method(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.ranking_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_positive_ints, default=list(SIZES), help="catalogue sizes (items)")
    parser.add_argument("--batches", type=_positive_ints, default=list(BATCHES), help="rows per call")
    parser.add_argument("--repeats", type=_positive_ints, default=[15], help="timed calls per point")
    parser.add_argument("--k", type=_positive_ints, default=[10], help="items served per row")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.k[0] > min(args.sizes):
        parser.error(f"--k {args.k[0]} exceeds the smallest catalogue ({min(args.sizes)} items)")
    result = rank_bench(args.sizes, args.batches, repeats=args.repeats[0], k=args.k[0])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
