"""Self-contained HTML reports: figures inlined as base64 PNG, tables as plain HTML, no external assets."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers and in CI
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
img { max-width: 100%; } .note { color: #555; font-size: 0.9rem; }
"""


def figure_html(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]], table_id: str = "") -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"<td>{value:.4f}</td>"
        if isinstance(value, int):
            return f"<td>{value}</td>"
        return f'<td class="text">{html.escape(str(value))}</td>'

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, sections: Sequence[str], script: str = "") -> str:
    body = "\n".join(sections)
    js = f"<script>{script}</script>" if script else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n{js}</body></html>"
    )
