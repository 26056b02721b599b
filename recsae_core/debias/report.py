"""The de-biasing report: every method's front on dev and test and the operating points, as one HTML page."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from recsae_core.common.artifacts import read_json
from recsae_core.common.html import figure_html, page, table_html
from recsae_core.debias.screen import (
    POLICY,
    K,
)


def write_report(folder: Path) -> Path:
    """RUN_DIR/debias/report.html from every <target>.json present: Pareto plots and the chosen points."""
    sections = []
    for path in sorted(folder.glob("*.json")):
        result = read_json(path)
        target = result["target"]
        sections.append(f"<h2>{html.escape(target)}</h2><p class='note'>{html.escape(result['selection'])}. "
                        f"{html.escape(result['head_tail'])}.</p>")  # fmt: skip
        for metric in result["pareto"]:
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
            for ax, zoom in zip(axes, (False, True), strict=True):
                _front_panel(ax, result, metric, zoom)
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            sections.append(figure_html(fig, f"{target}: NDCG@{K} against {metric}; right: zoomed on the budget"))
        rows = [["original", "", *_row(result["original"], result["pareto"])]]
        if result["chosen"]["metrics"]:
            rows.append([POLICY, result["chosen"]["strength"], *_row(result["chosen"]["metrics"], result["pareto"])])
        for name, best in result["baselines_at_budget"].items():
            rows.append(
                [
                    name,
                    best["strength"] if best else "none in budget",
                    *(_row(best["metrics"], result["pareto"]) if best else [""] * (len(result["pareto"]) + 1)),
                ]
            )
        sections.append(table_html(["method", "strength", f"ndcg@{K}", *result["pareto"]], rows))
    out = folder / "report.html"
    out.write_text(page("recsae de-biasing", sections))
    return out


def _front_panel(ax: plt.Axes, result: dict, metric: str, zoom: bool) -> None:
    """Every sweep point, the original and the chosen point; `zoom` keeps the points within 4x the NDCG budget,
    where the operating points are (the full sweep runs far past it and squeezes them into a corner)."""
    points, original = result["sweep"], result["original"]
    floor = original[f"ndcg@{K}"] * (1 - 4 * result["budget"]) if zoom else -np.inf
    for family in dict.fromkeys(map(_family, points)):
        mine = [p for p in points if _family(p) == family and p["metrics"][f"ndcg@{K}"] >= floor]
        xs = [_value(p["metrics"], metric) for p in mine]
        ax.scatter(xs, [p["metrics"][f"ndcg@{K}"] for p in mine], s=12, label=family, alpha=0.7)
    ax.scatter([_value(original, metric)], [original[f"ndcg@{K}"]], marker="*", s=150, c="k", label="original")
    if result["chosen"]["metrics"]:
        m = result["chosen"]["metrics"]
        ax.scatter([_value(m, metric)], [m[f"ndcg@{K}"]], marker="X", s=120, c="red", label="chosen")
    budget_line = original[f"ndcg@{K}"] * (1 - result["budget"])
    ax.axhline(budget_line, ls="--", c="grey", lw=0.8, label=f"-{result['budget']:.0%} NDCG")
    ax.set_xlabel(f"{metric} (test)")
    ax.set_ylabel(f"NDCG@{K} (test)")
    ax.set_title(f"within {4 * result['budget']:.0%} of the original NDCG@{K}" if zoom else "full sweep", fontsize=9)


def _family(point: dict) -> str:
    """A method, split by the policy family a steering point came from."""
    return f"{point['method']} ({point['weighting']})" if "weighting" in point else point["method"]


def _value(metrics: dict, metric: str) -> float:
    return abs(metrics["leakage_auc"] - 0.5) if metric == "leakage_distance" else metrics[metric]


def _row(metrics: dict, keys: dict) -> list[float]:
    return [metrics[f"ndcg@{K}"], *(_value(metrics, k) for k in keys)]
