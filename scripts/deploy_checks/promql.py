"""`promql`: every Prometheus query of a dashboard, its Grafana variables substituted, parsed by promtool."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .common import ToolMissing
from .dashboard import iter_panels, loaded_dashboards, panel_label

# Grafana's own variables, as a query sees them: durations, or numbers of milliseconds / seconds.
GRAFANA_BUILTINS = {
    "__interval": "5m",
    "__rate_interval": "5m",
    "__range": "5m",
    "__auto": "5m",
    "__interval_ms": "300000",
    "__range_ms": "300000",
    "__range_s": "300",
    "__from": "0",
    "__to": "0",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def _variable_values(d: dict[str, Any]) -> dict[str, str]:
    """What Grafana would put in place of each dashboard variable: the 'All' value, the current one, or a stand-in."""
    out = {}
    for v in (d.get("templating") or {}).get("list") or []:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            continue  # the dashboard check reports it
        current = (v.get("current") or {}).get("value")
        if isinstance(current, list):
            current = current[0] if current else None
        if current == "$__all" and v.get("includeAll"):
            current = v.get("allValue") or ".*"
        if not current and isinstance(v.get("query"), str) and v.get("type") in ("constant", "textbox", "custom"):
            current = v["query"].split(",")[0].strip()  # these keep their value(s) in `query`
        if v.get("type") == "interval":
            current = current if current and not str(current).startswith("$") else "5m"
        out[v["name"]] = str(current) if current and not str(current).startswith("$") else "x"
    return out


def substitute_variables(expr: str, values: dict[str, str]) -> tuple[str, list[str]]:
    """(the query with every variable replaced, names of undefined variables)."""
    unknown: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        if name in values:
            return values[name]
        if name.isdigit():  # a regex back-reference ("$1" in label_replace), not a variable
            return m.group(0)
        unknown.append(name)
        return "x"

    return _VARIABLE.sub(repl, expr), unknown


@dataclass
class Query:
    where: str
    label: str
    expr: str  # as written in the dashboard
    promql: str  # variables substituted


def dashboard_queries(d: dict[str, Any]) -> tuple[list[Query], list[str]]:
    values = _variable_values(d)
    queries, problems = [], []
    for where, p in iter_panels(d.get("panels") or []):
        panel_ds = p.get("datasource") if isinstance(p.get("datasource"), dict) else {}
        for j, target in enumerate(p.get("targets") or []):
            expr = target.get("expr") if isinstance(target, dict) else None
            if not isinstance(expr, str) or not expr.strip():
                continue
            ds = target.get("datasource") if isinstance(target.get("datasource"), dict) else panel_ds
            if ds.get("type", "prometheus") != "prometheus":
                continue  # Loki and others also name their query `expr`, in another language
            ref = target.get("refId", j)
            label = f"{panel_label(p)} target {ref}"
            promql, unknown = substitute_variables(expr, values)
            if unknown:
                problems.append(f"{where}.targets[{j}]: {label}: undefined variable(s) {sorted(set(unknown))}: {expr}")
            queries.append(Query(f"{where}.targets[{j}]", label, expr, promql))
    return queries, problems


def _rules_file(directory: Path, index: int, q: Query) -> Path:
    path = directory / f"query-{index}.yml"
    rule = {"record": f"dashboard:query_{index}", "expr": q.promql}
    path.write_text(yaml.safe_dump({"groups": [{"name": f"dashboard-query-{index}", "rules": [rule]}]}))
    return path


def check_promql(args: argparse.Namespace) -> int:
    promtool = args.promtool or os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool:
        raise ToolMissing("promtool not found: run scripts/install_tools.sh")
    failed = False
    for name, d in loaded_dashboards(args.dashboards):
        if d is None:
            failed = True
            continue
        if not isinstance(d, dict):
            print(f"ERROR {name}: a dashboard is a JSON object")
            failed = True
            continue
        queries, problems = dashboard_queries(d)
        with tempfile.TemporaryDirectory() as tmp:
            files = [_rules_file(Path(tmp), i, q) for i, q in enumerate(queries)]
            # One promtool run for all queries; only when it fails, one per query to say which.
            if files and subprocess.run([promtool, "check", "rules", *files], capture_output=True).returncode:
                for q, f in zip(queries, files, strict=True):
                    run = subprocess.run([promtool, "check", "rules", f], capture_output=True, text=True)
                    if run.returncode:
                        lines = [ln.strip() for ln in (run.stdout + run.stderr).splitlines()]
                        errors = [re.sub(r'^.*?rule \d+, "[^"]*": ', "", ln) for ln in lines if "rule " in ln]
                        why = "; ".join(errors) or "; ".join(ln for ln in lines if ln)
                        problems.append(f"{q.where}: {q.label}: {why}\n      expr: {q.expr}")
        for p in problems:
            print(f"ERROR {name} {p}")
        failed |= bool(problems)
        if not problems:
            print(f"OK {name}: {len(queries)} queries parsed by promtool")
    return 1 if failed else 0
