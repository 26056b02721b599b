"""`dashboard`: Grafana dashboards against grafana-foundation-sdk's models; the dashboard reading `promql` shares."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .grafana_models import GrafanaModels, grafana_models
from .schema_errors import schema_problems


def load_dashboard(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "dashboard" in data and "panels" not in data:
        data = data["dashboard"]  # the HTTP API's envelope
    return data


def loaded_dashboards(names: list[str]) -> Iterator[tuple[str, Any]]:
    """(name, dashboard) for each file, or (name, None) after printing why it could not be read."""
    for name in names:
        try:
            yield name, load_dashboard(name)
        except (OSError, json.JSONDecodeError) as e:
            print(f"ERROR {name}: {e}")
            yield name, None


def iter_panels(panels: list[Any], prefix: str = "panels") -> Iterator[tuple[str, dict[str, Any]]]:
    """(JSON path, panel) of every panel, including those inside collapsed rows."""
    for i, p in enumerate(panels):
        if isinstance(p, dict):
            yield f"{prefix}[{i}]", p
            yield from iter_panels(p.get("panels") or [], f"{prefix}[{i}].panels")


def panel_label(panel: dict[str, Any]) -> str:
    return f"panel {panel.get('id')} {json.dumps(panel.get('title', ''))}"


def dashboard_problems(d: Any, models: GrafanaModels) -> tuple[list[str], list[str]]:
    """(problems, notes) of one dashboard."""
    if not isinstance(d, dict):
        return ["<root>: a dashboard is a JSON object"], []
    problems = schema_problems(models.dashboard, d)
    notes = []
    ids: dict[Any, str] = {}
    for where, p in iter_panels(d.get("panels") or []):
        label = panel_label(p)
        if p.get("id") is not None:
            if p["id"] in ids:
                problems.append(f"{where}: {label}: id {p['id']} already used by {ids[p['id']]}")
            ids.setdefault(p["id"], label)
        kind = p.get("type")
        if kind == "row" or not isinstance(kind, str):
            continue
        if kind not in models.options and kind not in models.custom:
            notes.append(
                f"{where}: {label}: panel type {kind!r} has no model in grafana-foundation-sdk; options not checked"
            )
        if kind in models.options and "options" in p:
            problems += [
                f"{m} ({label})" for m in schema_problems(models.options[kind], p["options"], f"{where}.options")
            ]
        custom = ((p.get("fieldConfig") or {}).get("defaults") or {}).get("custom")
        if kind in models.custom and custom is not None:
            at = f"{where}.fieldConfig.defaults.custom"
            problems += [f"{m} ({label})" for m in schema_problems(models.custom[kind], custom, at)]
        panel_ds = p["datasource"].get("type") if isinstance(p.get("datasource"), dict) else None
        for j, target in enumerate(p.get("targets") or []):
            if not isinstance(target, dict):
                continue
            ds = target.get("datasource")
            ds_type = ds.get("type") if isinstance(ds, dict) else panel_ds
            at = f"{where}.targets[{j}]"
            if ds_type in models.queries:
                problems += [f"{m} ({label})" for m in schema_problems(models.queries[ds_type], target, at)]
            if ds_type == "prometheus" and isinstance(target.get("expr"), str) and not target["expr"].strip():
                problems.append(f"{at}.expr: empty query ({label})")
    return problems, notes


def check_dashboard(args: argparse.Namespace) -> int:
    models = grafana_models()
    failed = False
    for name, d in loaded_dashboards(args.dashboards):
        if d is None:
            failed = True
            continue
        problems, notes = dashboard_problems(d, models)
        for n in notes:
            print(f"   {name} {n}")
        for p in problems:
            print(f"ERROR {name} {p}")
        failed |= bool(problems)
        if not problems:
            count = sum(1 for _ in iter_panels(d.get("panels") or []))
            print(
                f"OK {name}: schemaVersion {d.get('schemaVersion')}, {count} panels "
                f"(grafana-foundation-sdk {models.sdk_version})"
            )
    return 1 if failed else 0
