"""The concept-control section of the debias report: RUN/debias/concepts.json (written by
`recsae_core.concepts.control`) as a table and a plot of precision (target drop / collateral) per concept, the
steering edit against the oracle re-ranker at the same drop."""

from __future__ import annotations

import html
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from recsae_core.common.html import figure_html, table_html

COLUMNS = ("latent", "label", "attribute", "users", "op", "target drop", "collateral", "NDCG loss", "precision",
           "oracle collateral", "oracle NDCG loss", "oracle precision")  # fmt: skip


def concept_section(result: dict[str, Any]) -> str:
    """The section's HTML: the figure's verdict, the plot and the table (genre concepts first)."""
    concepts = sorted(result["concepts"], key=lambda c: (c["role"] != "category", c["attribute"], c["latent"]))
    genre = result["summary"]["genre"]
    figure = result["summary"]["figure"]
    verdict = "met" if genre["met"] else "not met"
    parts = [
        "<h2>Concept control</h2>",
        f"<p class='note'>{len(concepts)} catalog concepts whose label names an item attribute, measured on the "
        f"test users in whom the latent fires (op chosen on validation users); {len(result['skipped'])} more could "
        f"not be measured. Precision = {html.escape(result['definitions']['precision'])}; the oracle re-ranker "
        f"lowers the attribute's items to the same drop; in the plot, concepts whose edit did not lower the "
        f"attribute (precision <= 0) sit at the floor, 1e-3.</p>",
        f"<p>Genre concepts: {genre['n']}, median target drop {_pct(genre['target_drop'])}, collateral "
        f"{_pct(genre['collateral'])} (oracle {_pct(genre['oracle_collateral'])}), NDCG@{result['k']} loss "
        f"{_pct(genre['ndcg_rel_loss'])}; {_pct(genre['share_meeting_figure'])} of them reach target drop "
        f"{html.escape(figure['target_drop'])}, collateral {html.escape(figure['collateral'])} and NDCG loss "
        f"{html.escape(figure['ndcg_rel_loss'])}: figure <b>{verdict}</b>.</p>",
    ]
    if concepts:
        plot = _precision_plot(concepts, result["config"])
        parts.append(figure_html(plot, "precision per concept, steering against the oracle"))
    rows = [[c["latent"], c["label"], c["attribute"], c["n_users"], _op(c["op"]), c["target_drop"], c["collateral"],
             c["ndcg_rel_loss"], c["precision"], c["oracle"]["collateral"], c["oracle"]["ndcg_rel_loss"],
             c["oracle"]["precision"]] for c in concepts]  # fmt: skip
    parts.append(table_html(COLUMNS, rows, "concept-control"))
    return "\n".join(parts)


def _precision_plot(concepts: list[dict[str, Any]], config: dict[str, Any]) -> plt.Figure:
    """Left: precision per concept (log scale, concepts by steering precision), steering and oracle. Right: target
    drop against collateral, with the figure's goal and collateral limit."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    floor = 1e-3  # a drop of 0 has precision 0, which a log axis cannot show
    order = sorted(concepts, key=lambda c: c["precision"])
    x = np.arange(len(order))
    for key, name, marker in ((None, "steering", "o"), ("oracle", "oracle re-ranker", "s")):
        points = [(c[key] if key else c) for c in order]
        left.scatter(x, [max(p["precision"], floor) for p in points], s=12, marker=marker, label=name)
        right.scatter([p["collateral"] for p in points], [p["target_drop"] for p in points], s=12, marker=marker,
                      label=name)  # fmt: skip
    left.set_yscale("log")
    if len(order) <= 60:  # beyond that the names are unreadable; the table has them
        left.set_xticks(x, [f"{c['label']} ({c['attribute'].split(':', 1)[-1]})" for c in order], rotation=90,
                        fontsize=6)  # fmt: skip
    else:
        left.set_xlabel("concepts, by steering precision")
    left.set_ylabel("precision = target drop / collateral")
    left.legend(fontsize=7)
    right.set_xlabel("collateral")
    right.set_ylabel("target drop")
    right.axhline(config["goal"], ls="--", c="grey", lw=0.8)
    right.axvline(config["max_collateral"], ls="--", c="grey", lw=0.8)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _op(op: dict[str, Any]) -> str:
    return "ablate" if op["op"] == "ablate" else f"{op['op']} {op['value']:g} {op['unit']}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
