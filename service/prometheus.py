"""Prometheus metrics of the service, through `ray.serve.metrics` (exported by Ray's metrics agent as `ray_<name>`).

Label sets stay small on purpose: concepts are labelled by name for the first `concept_metric_cap` catalogued
concepts only (the rest as `other`), never one series per latent; policies come from the bundle; routes are the
route templates. Every name is documented in docs/service.md.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.engine import Row, RowResult
    from service.served import Served

LATENCY_MS = [0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 2500, 5000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
L0 = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128]
FVU = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 5]
POPULARITY = [1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000]
SHARE = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
OTHER = "other"
_CURRENT: dict[str, ServiceMetrics] = {}


def register(metrics: ServiceMetrics) -> None:
    """Make `metrics` this process's (one replica per Ray actor process) for the HTTP middleware.

    A module-level registry here, not in service.app: Ray pickles the deployment class by value, so globals of
    service.app seen from its methods are copies, while this module is always imported by reference."""
    _CURRENT["metrics"] = metrics


def current() -> ServiceMetrics | None:
    return _CURRENT.get("metrics")


MAX_BUFFERED = 20_000
"""Buffered histogram observations that force a flush before the next refresh."""


class ConceptLabels:
    """Latent -> concept label index: the first `cap` catalogued concepts keep their name, later ones share
    `other`, uncatalogued latents are not counted (their firing shows in the L0 histogram and the drift gauge)."""

    def __init__(self, latent_names: dict[int, str], n_latents: int, cap: int) -> None:
        self.index = np.full(n_latents, -1, dtype=np.int64)
        self.labels: list[str] = []
        names = sorted(latent_names.items())
        for latent, name in names[:cap]:
            self.index[latent] = len(self.labels)
            self.labels.append(name)
        if len(names) > cap:
            for latent, _ in names[cap:]:
                self.index[latent] = len(self.labels)
            self.labels.append(OTHER)

    def counts(self, active: list[np.ndarray]) -> dict[str, int]:
        """Requests in which each label fired (a label counts once per request)."""
        if not active or not self.labels:
            return {}
        per_request = [np.unique(self.index[a][self.index[a] >= 0]) for a in active]
        flat = np.concatenate(per_request) if per_request else np.zeros(0, np.int64)
        counts = np.bincount(flat, minlength=len(self.labels))
        return {self.labels[i]: int(counts[i]) for i in np.flatnonzero(counts)}


class LiveWindow:
    """Sliding window over the last `size` monitored requests: latent firing counts, ARP and tail share."""

    def __init__(self, train_frequency: np.ndarray, size: int) -> None:
        self.size = size
        freq = np.asarray(train_frequency, dtype=np.float64)
        self.train = freq / freq.sum() if freq.sum() > 0 else freq
        self.counts = np.zeros(len(freq), dtype=np.int64)
        self.entries: deque[tuple[np.ndarray, float, float]] = deque()
        self.arp_sum = self.tail_sum = 0.0

    def add(self, latents: np.ndarray, arp: float, tail_share: float) -> None:
        # A request's active latents are distinct (top-k indices), so plain fancy-index increments are exact and
        # several times cheaper than np.add.at at this size.
        self.entries.append((latents, arp, tail_share))
        self.counts[latents] += 1
        self.arp_sum += arp
        self.tail_sum += tail_share
        if len(self.entries) > self.size:
            old, old_arp, old_tail = self.entries.popleft()
            self.counts[old] -= 1
            self.arp_sum -= old_arp
            self.tail_sum -= old_tail

    def drift(self) -> float:
        """Total-variation distance between the live and the training firing distributions over latents
        (0 = same mix of latents as in training, 1 = disjoint)."""
        total = self.counts.sum()
        if total == 0 or self.train.sum() == 0:
            return 0.0
        return float(0.5 * np.abs(self.counts / total - self.train).sum())

    def arp(self) -> float:
        return self.arp_sum / len(self.entries) if self.entries else 0.0

    def tail_share(self) -> float:
        return self.tail_sum / len(self.entries) if self.entries else 0.0


def policy_label(row: Row) -> str:
    if row.policy is not None:
        return row.policy
    return "custom" if row.edits else "none"


class ServiceMetrics:
    """All recsae_* metrics of one replica."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "recsae_requests",
            "HTTP requests by route, method, outcome and policy",
            tag_keys=("route", "method", "outcome", "policy"),
        )
        self.request_latency = Histogram(
            "recsae_request_latency_ms", "Replica-side request latency (ms)", boundaries=LATENCY_MS, tag_keys=("route",)
        )
        self.stage_latency = Histogram(
            "recsae_stage_latency_ms",
            "Engine time per batch and stage (ms)",
            boundaries=LATENCY_MS,
            tag_keys=("stage",),
        )
        self.batch_size = Histogram("recsae_batch_size", "Requests per engine batch", boundaries=BATCH_SIZES)
        self.l0 = Histogram("recsae_sae_l0", "Active SAE latents per request", boundaries=L0)
        self.fvu = Histogram("recsae_sae_fvu", "Per-request reconstruction FVU", boundaries=FVU)
        self.concepts = Counter(
            "recsae_concept_activations", "Requests in which a catalogued concept fired", tag_keys=("concept",)
        )
        self.edits = Counter("recsae_steering_edits", "Latent edits applied, by op", tag_keys=("op",))
        self.served = Counter("recsae_served_items", "Items served", tag_keys=("policy",))
        self.served_tail = Counter("recsae_served_tail_items", "Tail items served", tag_keys=("policy",))
        self.list_arp = Histogram(
            "recsae_list_arp",
            "Mean training popularity of one served list",
            boundaries=POPULARITY,
            tag_keys=("policy",),
        )
        self.list_tail = Histogram(
            "recsae_list_tail_share", "Tail share of one served list", boundaries=SHARE, tag_keys=("policy",)
        )
        self.live_arp = Gauge("recsae_live_arp", "ARP over the live window")
        self.live_tail = Gauge("recsae_live_tail_share", "Tail share over the live window")
        self.drift = Gauge("recsae_latent_drift", "TV distance of live vs training latent firing (window)")
        self.window_requests = Gauge("recsae_live_window_requests", "Monitored requests in the live window")
        self.bundle_info = Gauge(
            "recsae_bundle_info", "1 for the bundle being served", tag_keys=("bundle", "model", "sae")
        )
        self.reloads = Counter("recsae_bundle_reloads", "Bundle (re)loads by outcome", tag_keys=("outcome",))
        self.steering_enabled = Gauge("recsae_steering_enabled", "0 while the steering kill switch is on, else 1")
        self.steering_suppressed = Counter(
            "recsae_steering_suppressed", "Steering requests served unsteered because of the kill switch"
        )
        self._steering = 1.0
        # Per-request updates are buffered and sent to Ray by flush() (the replica's 1 s refresher): every Ray
        # metric call costs tens of microseconds, which on the request path added ~1.5 ms per request at
        # concurrency 1. Counters are summed per tag set before sending; histogram observations are replayed.
        self._counts: dict[tuple[Any, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._observations: list[tuple[Any, float, dict[str, str] | None]] = []
        self.labels: ConceptLabels | None = None
        self.window: LiveWindow | None = None
        self._info: dict[str, str] | None = None

    def use_bundle(self, served: Served, concept_cap: int, window: int) -> None:
        """Reset the per-bundle state (labels, live window, bundle info) for a newly served bundle."""
        sae = served.engine.sae
        self.labels = ConceptLabels(served.catalog.latent_name, sae.n_latents, concept_cap)
        self.window = LiveWindow(sae.stats.frequency.numpy(), window)
        self._info = {k: str(served.versions.get(k)) for k in ("bundle", "model", "sae")}
        self.refresh()

    def _inc(self, metric: Any, value: float, tags: dict[str, str] | None = None) -> None:
        self._counts[(metric, tuple(sorted(tags.items())) if tags else ())] += value

    def _observe(self, metric: Any, value: float, tags: dict[str, str] | None = None) -> None:
        self._observations.append((metric, value, tags))
        if len(self._observations) >= MAX_BUFFERED:
            self.flush()

    def flush(self) -> None:
        """Send the buffered counter increments and histogram observations to Ray."""
        counts, self._counts = self._counts, defaultdict(float)
        observations, self._observations = self._observations, []
        for (metric, tags), value in counts.items():
            metric.inc(value, tags=dict(tags) if tags else None)
        for metric, value, tags in observations:
            metric.observe(value, tags=tags)

    def request(self, route: str, method: str, outcome: str, policy: str, latency_ms: float) -> None:
        self._inc(self.requests, 1, tags={"route": route, "method": method, "outcome": outcome, "policy": policy})
        self._observe(self.request_latency, latency_ms, tags={"route": route})

    def batch(self, served: Served, rows: list[Row], results: list[RowResult], timings: dict[str, float]) -> None:
        for stage, value in timings.items():
            self._observe(self.stage_latency, value, tags={"stage": stage})
        self._observe(self.batch_size, len(rows))
        active = []
        for row, result in zip(rows, results, strict=True):
            policy = policy_label(row)
            if row.suppressed:
                self._inc(self.steering_suppressed, 1)
            items = result.items
            arp = float(served.popularity[items].mean()) if len(items) else 0.0
            tail = float((~served.head[items]).mean()) if len(items) else 0.0
            n_tail = int((~served.head[items]).sum())
            if len(items):
                self._inc(self.served, len(items), tags={"policy": policy})
                self._observe(self.list_arp, arp, tags={"policy": policy})
                self._observe(self.list_tail, tail, tags={"policy": policy})
            if n_tail:
                self._inc(self.served_tail, n_tail, tags={"policy": policy})
            for edit in row.edits:
                self._inc(self.edits, 1, tags={"op": edit.op})
            if result.fvu is None:
                continue  # bare mode: nothing monitored
            self._observe(self.l0, len(result.latents))
            self._observe(self.fvu, result.fvu)
            active.append(result.latents)
            if self.window is not None:
                self.window.add(result.latents, arp, tail)
        if self.labels is not None:
            for concept, count in self.labels.counts(active).items():
                self._inc(self.concepts, count, tags={"concept": concept})
        # The gauges (drift, live ARP, ...) are re-exported by the replica's 1 s refresher, not here: each Ray
        # metric call costs tens of microseconds, and six more per request showed up in the c=1 latency.

    def refresh(self) -> None:
        """Re-export the gauges: Ray's metrics agent drops a gauge that has not been set for two export
        intervals, so the replica calls this periodically (which also flushes the buffered per-request updates)."""
        self.flush()
        if self._info is not None:
            self.bundle_info.set(1, tags=self._info)
        self.steering_enabled.set(self._steering)
        if self.window is not None and self.window.entries:
            self.drift.set(self.window.drift())
            self.live_arp.set(self.window.arp())
            self.live_tail.set(self.window.tail_share())
            self.window_requests.set(len(self.window.entries))

    def steering_switch(self, enabled: bool) -> None:
        self._steering = 1.0 if enabled else 0.0
        self.steering_enabled.set(self._steering)

    def reload(self, outcome: str) -> None:
        self.reloads.inc(1, tags={"outcome": outcome})
