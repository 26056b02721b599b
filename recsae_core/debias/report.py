"""The de-biasing report: per target, every method's front at equal test NDCG loss with its 95% bootstrap band, the
operating points chosen on validation, the comparison table and the verdict; then the concept-control section
(`concept_report`, from RUN/debias/concepts.json when `recsae concept-control` wrote it). One self-contained page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from recsae_core.common.artifacts import read_json
from recsae_core.common.html import figure_html, page, table_html
from recsae_core.common.layout import CONCEPT_CONTROL
from recsae_core.debias.concept_report import concept_section
from recsae_core.debias.screen import K


def write_report(folder: Path) -> Path:
    """RUN_DIR/debias/report.html from every <target>.json present and the concept-control table if present."""
    sections = []
    for path in sorted(folder.glob("*.json")):
        if path.name == CONCEPT_CONTROL:  # not a target: its own section, last
            continue
        result = read_json(path)
        if "comparison" not in result:
            title = html.escape(str(result.get("target", path.stem)))
            sections.append(f"<h2>{title}</h2><p class='note'>written by an older recsae, without fronts; run "
                            "<code>recsae debias</code> again.</p>")  # fmt: skip
            continue
        sections.append(target_section(result))
    if (folder / CONCEPT_CONTROL).is_file():
        sections.append(concept_section(read_json(folder / CONCEPT_CONTROL)))
    out = folder / "report.html"
    out.write_text(page("recsae de-biasing", sections))
    return out


def target_section(result: dict[str, Any]) -> str:
    target = result["target"]
    parts = [f"<h2>{html.escape(target)}</h2>",
             f"<p class='note'>{html.escape(result['selection'])}. {html.escape(result['head_tail'])}.</p>",
             f"<p>{html.escape(_verdict_text(result))}</p>"]  # fmt: skip
    metrics = result["bias_metrics"]
    for start in range(0, len(metrics), 2):
        pair = metrics[start : start + 2]
        fig, axes = plt.subplots(1, len(pair), figsize=(6.2 * len(pair), 4.4), squeeze=False)
        for ax, metric in zip(axes[0], pair, strict=True):
            _front_panel(ax, result, metric)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        parts.append(figure_html(fig, f"{target}: {', '.join(pair)} against test NDCG@{K} loss"))
    parts.append(f"<h3>Operating points (chosen on validation, measured on test)</h3>{_operating_table(result)}")
    for loss, by_method in result["comparison"].items():
        rows = [[method, *(_cell(by_method[method][m]) for m in metrics)] for method in by_method]
        parts.append(f"<h3>At {float(loss):.0%} test NDCG@{K} loss (interpolated along each front)</h3>"
                     + table_html(["method", *metrics], rows, f"comparison-{loss}"))  # fmt: skip
    return "\n".join(parts)


def _front_panel(ax: plt.Axes, result: dict[str, Any], metric: str) -> None:
    """Each method's front with its band; its operating point as a marker; the budget as a line."""
    fronts = result["fronts"]
    loss = fronts["loss"]
    colours = plt.get_cmap("tab10")
    steering = result.get("steering")
    for i, (method, by_metric) in enumerate(m for m in fronts["methods"].items() if m[0] != "steering"):
        band = by_metric[metric]
        kept = [j for j, v in enumerate(band["value"]) if v is not None]
        if not kept:
            continue
        role = result["methods"][method]["role"]
        colour = colours(i % 10)
        label = f"{method} (steering, chosen)" if method == steering else method
        xs = [loss[j] for j in kept]
        ax.plot(xs, [band["value"][j] for j in kept], ls="-" if role == "steering" else "--", c=colour,
                lw=2.2 if method == steering else 1.2, label=label)  # fmt: skip
        lows, highs = [band["low"][j] for j in kept], [band["high"][j] for j in kept]
        if all(v is not None for v in lows + highs):
            ax.fill_between(xs, lows, highs, color=colour, alpha=0.15, lw=0)
        # The swept points themselves, faint: a front keeps only the points no weaker one beats (for the NDCG gap,
        # often none but the original), so the points show what each strength did.
        points = [p for p in result["sweep"] if p["method"] == method and p["ndcg_rel_loss"] <= loss[-1]]
        ax.scatter([p["ndcg_rel_loss"] for p in points], [p["metrics"][metric] for p in points], s=7, c=[colour],
                   alpha=0.35, lw=0)  # fmt: skip
        point = result["operating_points"].get(method, {})
        if point.get("strength") is not None:
            test = point["test"]
            ax.scatter([test["ndcg_rel_loss"]["value"]], [test["metrics"][metric]["value"]], marker="o", s=40,
                       c=[colour], edgecolors="k", zorder=3)  # fmt: skip
    ax.scatter([0.0], [result["original"][metric]], marker="*", s=150, c="k", label="original", zorder=4)
    ax.axvline(result["budget"], ls=":", c="grey", lw=0.8)
    ax.set_xlabel(f"relative NDCG@{K} loss (test)")
    ax.set_ylabel(f"{metric} (test)")
    ax.set_title(f"{metric}: fronts with 95% bands; dots = operating points; dotted = budget", fontsize=9)


def _operating_table(result: dict[str, Any]) -> str:
    objective = "leakage_distance" if "leakage_distance" in result["bias_metrics"] else f"arp@{K}"
    rows = []
    for method, point in result["operating_points"].items():
        role = result["methods"][method]["role"] + (" (chosen)" if method == result.get("steering") else "")
        if point.get("strength") is None:
            rows.append([method, role, "none", "", "", "", point.get("reason", "")])
            continue
        test = point["test"]
        change = test.get("rel_change", {}).get(objective)
        rows.append([method, role, f"{point['strength']:g}", point["smoothed_dev_ndcg_rel_loss"],
                     _cell(test["ndcg_rel_loss"]), _cell(test["metrics"][objective]),
                     _cell(change) if change else ""])  # fmt: skip
    headers = ["method", "role", "strength", "dev loss (isotonic)", "test loss", f"{objective} (test)",
               f"{objective} change"]  # fmt: skip
    return table_html(headers, rows, "operating-points")


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return (entry or {}).get("reason", "n/a")
    ci = entry.get("ci95")
    return f"{entry['value']:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


def _verdict_text(result: dict[str, Any]) -> str:
    verdict = result.get("verdict") or {}
    if verdict.get("steering") is None:
        return f"Verdict: {verdict.get('reason', 'no steering operating point')}."
    family = result.get("steering")
    if "leakage_distance_change" in verdict:
        change, gap = verdict["leakage_distance_change"], verdict["ndcg_gap"]
        return (f"Steering ({family}, strength {verdict['strength']:g}) at its operating point: test NDCG@{K} loss "
                f"{_cell(verdict['ndcg_rel_loss'])}, leakage distance change {_cell(change)}, NDCG gap "
                f"{gap['original']:.4g} -> {_cell(gap['steered'])}. Goal (halved at <= 2% loss, gap not wider): "
                f"{'met' if verdict['met'] else 'not met'}.")  # fmt: skip
    lines = [f"Steering ({family}) against the best re-ranker at equal test loss:"]
    for loss, by_metric in verdict["at"].items():
        for metric, v in by_metric.items():
            lines.append(f"{float(loss):.0%} {metric}: steering {_cell(v['steering'])}, {v['best_reranker']} "
                         f"{_cell(v['reranker'])}, difference {_cell(v['difference'])}"
                         f"{' (beyond the interval)' if v['better_beyond_interval'] else ''};")  # fmt: skip
    deep = verdict["deep_tail_coverage_at_0.02"]
    change = deep.get("rel_change")
    lines.append(f"deep-tail coverage change at 2%: {'n/a' if change is None else f'{change:+.1%}'} (goal "
                 f"+{deep['goal']:.0%}). Figures {'met' if verdict['met'] else 'not met'}.")  # fmt: skip
    return " ".join(lines)
