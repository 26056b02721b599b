"""The serving engine, compute only: a batch of parsed rows -> h (the bundle's ONNX model) -> SAE (monitor, and
steer the rows that carry edits) -> scores -> top-k.

Plain Python (no Ray), vectorised over a batch in which each row carries its own edits. Without edits the SAE only
observes: h goes to the ranking untouched, so scores are the original model's. With edits, h' = h + (z' - z) W_dec
(recsae_core.sae.runtime); rows with a fitted policy (erase, spectral, calibrated, popsteer) then get its transform
(recsae_core.debias.policy_kinds), one numpy call per policy over the rows that ask for it; every steered row's
served items also get their unsteered rank. Parsing requests is service.requests' job, and shaping answers
service.responses'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recsae_core.bundle.format import Bundle
from recsae_core.debias.policy_kinds import FittedPolicy, apply_policy
from recsae_core.probe.collect import open_onnx
from recsae_core.recommenders.ranking import ItemScorer, Masked, count_above, top_k
from recsae_core.recommenders.recipe import pack_histories
from recsae_core.sae.edits import Edit
from recsae_core.sae.runtime import SAERuntime, total_variance


def limit_threads(threads: int) -> None:
    """Process-wide: torch and BLAS (numpy) use `threads` threads. Call once per replica process. Small matrix
    products with more BLAS threads than free cores cost ~50x more (measured: 36 ms vs 0.7 ms for a 16-row batch)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


@dataclass
class Row:
    """One parsed request, ready for the engine (dense indices, validated edits)."""

    user: int | None = None
    """A bundle user's index, or None for a history."""
    history: np.ndarray | None = None
    """Item indices, oldest first (when `user` is None)."""
    k: int = 10
    """Items to return."""
    exclude_seen: bool = True
    """Mask the user's known items (or the history)."""
    edits: list[Edit] = field(default_factory=list)
    """Validated edits to apply (empty: the SAE only observes)."""
    explain: bool = False
    """The answer lists active latents and applied edits."""
    policy: str | None = None
    """The bundled policy the edits came from, if any."""
    suppressed: bool = False
    """Steering was asked for but the kill switch is on: served unsteered."""
    transform: FittedPolicy | None = None
    """The fitted policy to apply after the edits (None: none)."""
    strength: float = 1.0
    """The request's multiplier of the policy's strength."""
    edit_weights: list[float] | None = None
    """Per edit, the multiplier of its change z' - z (a policy's edits at the request's strength); None: all 1."""


@dataclass
class RowResult:
    """What the engine computed for one row (indices; service.responses turns it into JSON)."""

    items: np.ndarray
    """Served item indices, best first."""
    scores: np.ndarray
    """Their scores (finite: masked items are never served)."""
    original_ranks: np.ndarray | None = None
    """Each served item's rank without the edits (steered rows only)."""
    latents: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Active latents of the unedited code z, by activation, descending (empty when the SAE is off)."""
    activations: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """Their activations."""
    z_new: np.ndarray | None = None
    """The code behind the served h (dense row) when the row was steered: the edited code, or, with a fitted
    policy, the SAE's code of the steered h (PopSteer's shifted code; for the others only when explained)."""
    z_edited: np.ndarray | None = None
    """z at the edited latents, before the edit."""
    fvu: float | None = None
    """The row's reconstruction FVU (None when the SAE is off)."""
    policy_detail: dict[str, Any] | None = None
    """The row's numbers behind a fitted policy's move (None without one)."""


class Engine:
    """The compute one replica runs for one bundle: its ONNX session, SAE and item matrix."""

    def __init__(self, bundle: Bundle, sae: SAERuntime, threads: int = 1) -> None:
        """`sae` with its latent statistics (SAERuntime.load of the bundle's SAE folder)."""
        self.bundle, self.sae = bundle, sae
        self.session = open_onnx(bundle.model_path, threads)
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "h" if "h" in outputs else outputs[0]
        self.emb_t = np.ascontiguousarray(bundle.item_embeddings.T, dtype=np.float32)
        self.bias = None if bundle.item_bias is None else bundle.item_bias.astype(np.float32)
        self.ranker = ItemScorer(self.emb_t, self.bias)
        """Ranks a block of items at a time (recsae_core.recommenders.ranking): no (rows, n_items) matrix."""
        self.popularity = np.asarray(bundle.items["popularity"], dtype=np.float64)
        self.h_var = self._calibrate()
        """The FVU denominator: total_variance of h over (up to 512) bundle users."""
        self._warm_up()

    def represent(self, rows: list[Row]) -> np.ndarray:
        """h for every row: the ONNX model for known users (and for histories of sequence models), the fold-in
        map for new users of user-embedding models."""
        spec = self.bundle.inputs
        h = np.empty((len(rows), self.bundle.d), dtype=np.float32)
        if spec.feeds_histories:
            h[:] = self.session.run([self.output], self._history_feed(rows))[0]
            return h
        known = [i for i, row in enumerate(rows) if row.user is not None]
        if known:
            users = np.asarray([rows[i].user for i in known])
            feed = {name: self.bundle.user_inputs[name][users] for name in spec.names}
            h[known] = self.session.run([self.output], feed)[0]
        for i, row in enumerate(rows):
            if row.user is None:
                h[i] = self.bundle.foldin[:, np.unique(row.history)].sum(1)
        return h

    def _history_feed(self, rows: list[Row]) -> dict[str, np.ndarray]:
        """A sequence model's inputs: a known user's stored row, or a history's newest max_len items in the model's
        own indices, padded on the model's side, with its item count when the model takes one. The stored rows were
        built by the same rule (load_bundle checks), so a user's history as a request is fed exactly as the user."""
        spec, stored = self.bundle.inputs, self.bundle.user_inputs
        seqs = np.full((len(rows), spec.max_len), spec.pad_id, dtype=stored[spec.history_input].dtype)
        lengths = None
        if spec.length_input is not None:  # as stored: (n,) or (n, 1), in the dtype the model declares
            stored_lengths = stored[spec.length_input]
            lengths = np.zeros((len(rows), *stored_lengths.shape[1:]), stored_lengths.dtype)
        known = [i for i, row in enumerate(rows) if row.user is not None]
        for i in known:
            seqs[i] = stored[spec.history_input][rows[i].user]
            if lengths is not None:
                lengths[i] = stored_lengths[rows[i].user]
        asked = [i for i, row in enumerate(rows) if row.user is None]
        if asked:
            index = self.bundle.model_index
            tails = [rows[i].history[-spec.max_len :] for i in asked]
            packed, counts = pack_histories([t if index is None else index[t] for t in tails], spec.max_len,
                                            spec.pad_id, spec.padding)  # fmt: skip
            seqs[asked] = packed
            if lengths is not None:
                lengths[asked] = counts.reshape(-1, *stored_lengths.shape[1:])
        feed = {spec.history_input: seqs}
        if lengths is not None:
            feed[spec.length_input] = lengths
        return feed

    def _known(self, row: Row) -> np.ndarray:
        """The row's known items: a bundle user's seen items, or the request's history."""
        return self.bundle.seen(row.user) if row.user is not None else row.history

    def _masks(self, rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
        mask_rows, mask_cols = [], []
        for i, row in enumerate(rows):
            if not row.exclude_seen:
                continue
            seen = self._known(row)
            mask_rows.append(np.full(len(seen), i, dtype=np.int64))
            mask_cols.append(seen)
        if not mask_rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(mask_rows), np.concatenate(mask_cols)

    def scores(self, h: np.ndarray) -> np.ndarray:
        out = h @ self.emb_t
        if self.bias is not None:
            out += self.bias
        return out

    def recommend(self, rows: list[Row], sae: bool = True) -> tuple[list[RowResult], dict[str, float]]:
        """Answer a batch; returns per-row results and stage timings in milliseconds."""
        t0 = time.perf_counter()
        h = self.represent(rows)
        t1 = time.perf_counter()
        h_use, steered_codes = h, None
        active: list[tuple[np.ndarray, np.ndarray]] = []
        fvu = np.zeros(0)
        edited = [i for i, row in enumerate(rows) if row.edits]
        steered = [i for i, row in enumerate(rows) if row.edits or row.transform is not None]
        if steered and not sae:
            raise ValueError("rows with edits or a fitted policy need the SAE (sae=True)")
        by_policy: dict[int, tuple[np.ndarray | None, dict[str, Any]]] = {}
        if sae:
            seen = self.sae.monitor(h, self.h_var)
            active, fvu = [seen.codes.active(i) for i in range(len(rows))], seen.fvu
            if edited:
                weights = [row.edit_weights for row in rows] if any(row.edit_weights for row in rows) else None
                steered_codes = self.sae.steer(h, [row.edits for row in rows], seen.codes, weights)
                h_use = steered_codes.h
            if any(row.transform is not None for row in rows):
                h_use, by_policy = self._apply_policies(rows, h, h_use)
        t2 = time.perf_counter()
        masked = Masked(*self._masks(rows))
        results = self._top(rows, h_use, masked)
        if steered:
            above = count_above(self.ranker, h[steered], [results[i].items for i in steered], masked.take(steered))
            for j, i in enumerate(steered):
                results[i].original_ranks = 1 + above[j]
                if rows[i].edits:
                    results[i].z_new = steered_codes.z_new[i]
                    results[i].z_edited = steered_codes.z[i, [e.latent for e in rows[i].edits]]
            self._policy_results(rows, results, h_use, by_policy)
        for i, (latents, activations) in enumerate(active):
            results[i].latents, results[i].activations, results[i].fvu = latents, activations, float(fvu[i])
        t3 = time.perf_counter()
        timings = {"represent": t1 - t0, "sae": t2 - t1, "rank": t3 - t2, "total": t3 - t0}
        return results, {k: v * 1000 for k, v in timings.items()}

    def _apply_policies(
        self, rows: list[Row], h: np.ndarray, h_use: np.ndarray
    ) -> tuple[np.ndarray, dict[int, tuple[np.ndarray | None, dict[str, Any]]]]:
        """Each fitted policy in the batch applied once, to the rows that ask for it (after their edits). A
        calibrated policy reads each row's unsteered list (from h, its known items masked whatever exclude_seen says,
        so the per-user strength does not depend on request flags) and known items. Returns the new h and, per row,
        the code behind it (PopSteer) and the numbers behind the move."""
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if row.transform is not None:
                groups.setdefault(id(row.transform), []).append(i)
        out, by_row = h_use.copy(), {}
        for indices in groups.values():
            policy = rows[indices[0]].transform
            lists = histories = None
            if policy.list_k is not None:  # blocked, as the served lists: no (rows, n_items) matrix at 1M items
                histories = [self._known(rows[i]) for i in indices]
                known = Masked(np.repeat(np.arange(len(indices)), [len(seen) for seen in histories]),
                               np.concatenate(histories).astype(np.int64))  # fmt: skip
                lists = top_k(self.ranker, h[indices], policy.list_k, known).items
            strength = np.asarray([rows[i].strength for i in indices])
            applied = apply_policy(policy, out[indices], strength, sae=self.sae, lists=lists, histories=histories,
                                   popularity=self.popularity)  # fmt: skip
            out[indices] = applied.h
            for j, i in enumerate(indices):
                code = None if applied.z_new is None else applied.z_new[j]
                by_row[i] = (code, {key: values[j] for key, values in applied.detail.items()})
        return out, by_row

    def _policy_results(
        self, rows: list[Row], results: list[RowResult], h_use: np.ndarray,
        by_policy: dict[int, tuple[np.ndarray | None, dict[str, Any]]],
    ) -> None:  # fmt: skip
        """Rows with a fitted policy: its per-row numbers, and the code behind the served h (encoded here, in one
        call, for the explained rows whose policy does not compute it)."""
        encode = []
        for i, (code, detail) in by_policy.items():
            results[i].policy_detail = detail
            if code is not None:
                results[i].z_new = code
            elif rows[i].explain:
                encode.append(i)
        if encode:
            codes = self.sae.encode(h_use[encode]).dense(self.sae.n_latents)
            for j, i in enumerate(encode):
                results[i].z_new = codes[j]

    def _top(self, rows: list[Row], h: np.ndarray, masked: Masked) -> list[RowResult]:
        """Each row's k best unmasked items (score descending, then index ascending)."""
        best = top_k(self.ranker, h, max(row.k for row in rows), masked)
        out = []
        for i, row in enumerate(rows):
            chosen, chosen_scores = best.items[i, : row.k], best.scores[i, : row.k]
            finite = np.isfinite(chosen_scores)
            out.append(RowResult(items=chosen[finite], scores=chosen_scores[finite]))
        return out

    # ---------------------------------------------------------------- start-up

    def _calibrate(self, max_users: int = 512) -> float:
        """total_variance of h over up to `max_users` bundle users, evenly spaced."""
        n_users = len(self.bundle.user_ids)
        users = np.unique(np.linspace(0, n_users - 1, min(max_users, n_users)).astype(np.int64))
        h = np.concatenate(
            [self.represent([Row(user=int(u)) for u in users[s : s + 256]]) for s in range(0, len(users), 256)]
        )
        return total_variance(h)

    def _warm_up(self) -> None:
        rows = [Row(user=0, explain=True)]
        frequency = self.sae.stats.frequency.numpy()
        if float(frequency.max()) > 0:
            rows.append(Row(user=0, edits=[Edit(int(np.argmax(frequency)), "nudge", 1.0, "std")], explain=True))
        self.recommend(rows)
        self.recommend(rows[:1], sae=False)
