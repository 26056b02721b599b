"""The concept catalog's self-contained HTML report: summary, score distributions, and a searchable table of every
concept with its terms, top items and activation histogram."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from recsae_core.common.artifacts import write_text_atomic
from recsae_core.common.html import figure_html, page, table_html

SCRIPT = """
const box = document.getElementById('search'), rows = [...document.querySelectorAll('#concepts tbody tr')];
function filter() {
  const words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const row of rows) {
    const text = row.textContent.toLowerCase();
    row.hidden = !words.every(w => text.includes(w));
    shown += row.hidden ? 0 : 1;
  }
  document.getElementById('shown').textContent = shown + ' of ' + rows.length + ' concepts';
}
box.addEventListener('input', filter);
const q = new URLSearchParams(location.hash.slice(1)).get('q');
if (q) box.value = q;
filter();
"""
EXTRA_STYLE = (
    "<style>#search{font-size:1rem;padding:.3rem;width:24rem} td.text{max-width:30rem} "
    "svg.hist rect{fill:#4a7bb7} details summary{cursor:pointer}</style>"
)


def _sparkline(counts: list[int], width: int = 100, height: int = 24) -> str:
    """An inline SVG histogram (no images: a thousand concepts stay light)."""
    top = max(max(counts, default=0), 1)
    bar = width / max(len(counts), 1)
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - c / top * height:.1f}" width="{bar * 0.9:.1f}" '
        f'height="{c / top * height:.1f}"/>'
        for i, c in enumerate(counts)
    )
    label = 'role="img" aria-label="activation histogram"'
    return f'<svg class="hist" width="{width}" height="{height}" {label}>{rects}</svg>'


def _score_figure(catalog: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    concepts = catalog["concepts"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    conf = [c["confidence"] for c in concepts if c["confidence"] is not None]
    auc = [c["auc"] for c in concepts if c["auc"] is not None]
    axes[0].hist(conf, bins=np.linspace(0, 1, 12), color="#4a7bb7")
    axes[0].set(title="Confidence (paper protocol)", xlabel="accuracy", ylabel="concepts")
    axes[1].hist(auc, bins=np.linspace(0, 1, 21), color="#4a7bb7")
    axes[1].set(title="Detection ROC-AUC", xlabel="AUC")
    coh = catalog["summary"]["coherence"]
    keys = [k for k in ("sae", "sae_all", "neurons", "random_sae") if coh.get(k) is not None]
    axes[2].bar(keys, [coh[k] for k in keys], color="#4a7bb7")
    axes[2].set(title="Coherence (mean cosine)")
    return figure_html(fig, "score distributions")


def write_report(catalog: dict[str, Any], histograms: dict[int, list[int]], path: Path) -> None:
    """Self-contained HTML: summary, score distributions, and a searchable table of every concept."""
    s = catalog["summary"]
    summary_rows = [
        (k, v if isinstance(v, int | float) else str(v))
        for k, v in s.items() if k not in ("coherence", "by_labeler", "llm")
    ] + [(f"coherence {k}", v if v is not None else "n/a") for k, v in s["coherence"].items()]  # fmt: skip
    for lab, metrics in s.get("by_labeler", {}).items():
        summary_rows += [(f"{lab}: {k}", v) for k, v in metrics.items()]
    summary_rows += [(f"llm {k}", v) for k, v in s.get("llm", {}).items()]
    body = []
    for c in catalog["concepts"]:
        terms = ", ".join(f"{t['term']} ×{t['lift']:.1f}" for t in c["terms"]) or "—"
        items = "".join(f"<li>{html.escape(t)}</li>" for t in c["examples"]["recommended"])
        watched = "".join(f"<li>{html.escape(t)}</li>" for t in c["examples"].get("last_watched", []))
        conf = "—" if c["confidence"] is None else f"{c['confidence']:.2f}"
        auc = "—" if c["auc"] is None else f"{c['auc']:.3f}"
        body.append(
            f'<tr class="concept" data-latent="{c["latent"]}"><td>{c["latent"]}</td>'
            f'<td class="text"><b>{html.escape(c["name"])}</b></td>'
            f'<td class="text">{html.escape(c["description"])}<details><summary>terms and top items</summary>'
            f"<p>{html.escape(terms)}</p><p>Recommended next:</p><ol>{items}</ol>"
            f"<p>Last watched:</p><ol>{watched}</ol></details></td>"
            f"<td>{conf}</td><td>{auc}</td><td>{c['frequency']:.4f}</td><td class='text'>{c['labeler']}</td>"
            f"<td>{_sparkline(histograms.get(c['latent'], []))}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("latent", "name", "description", "confidence", "AUC", "frequency",
                                             "labeler", "activations"))  # fmt: skip
    sections = [
        EXTRA_STYLE,
        f"<p class='note'>Labeler: {html.escape(catalog['labeler'])}; version {catalog['version']}; "
        f"{html.escape(catalog['protocol']['paper'])}; {html.escape(catalog['protocol']['detection'])}.</p>",
        "<h2>Summary</h2>" + table_html(["metric", "value"], summary_rows, "summary"),
        "<h2>Score distributions</h2>" + _score_figure(catalog),
        "<h2>Concepts</h2><input id='search' type='search' placeholder='search names, descriptions, terms, items'>"
        " <span id='shown'></span>",
        f'<table id="concepts"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>',
    ]
    text = page(f"Concept catalog — {catalog['run'].get('dataset')} {catalog['run'].get('model')}", sections, SCRIPT)
    write_text_atomic(path, text)
