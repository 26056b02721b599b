"""The import graph follows the flow: each stage package imports only earlier stages and `common`, no module
imports itself back through a circle, and `service/` sits on top of recsae_core, never below it.

Reads the source with `ast` (every import, including the ones inside functions), so it checks the code as written,
not what one test run happens to execute."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {
    "recsae_core.common": 0,
    "recsae_core.data": 1,
    "recsae_core.recommenders": 2,
    "recsae_core.probe": 3,
    "recsae_core.sae": 4,
    "recsae_core.concepts": 5,
    "recsae_core.debias": 5,
    "recsae_core.bundle": 6,
    "recsae_core.pipeline": 7,
    "service": 8,
}
"""Packages of equal rank (concepts, debias) are siblings: neither may import the other."""


def modules() -> dict[str, Path]:
    out = {}
    for top in ("recsae_core", "service"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules imported by the module at `path` (resolved to the longest known module name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                package = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")
                base = ".".join([*package, node.module])
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            parts = target.split(".")
            for cut in range(len(parts), 0, -1):
                candidate = ".".join(parts[:cut])
                if candidate in known:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def package_of(module: str) -> str:
    return next(p for p in sorted(RANK, key=len, reverse=True) if module == p or module.startswith(p + "."))


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def test_every_module_belongs_to_a_stage() -> None:
    for name in graph():
        assert name == "recsae_core" or any(name == p or name.startswith(p + ".") for p in RANK), name


def test_no_import_runs_back_up_the_flow() -> None:
    upward = []
    for name, targets in graph().items():
        if name == "recsae_core":
            continue
        own = package_of(name)
        for target in targets:
            other = package_of(target)
            if other != own and RANK[other] >= RANK[own]:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that run back up the flow:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_service() -> None:
    bad = [
        f"{n} -> {t}" for n, ts in graph().items() if n.startswith("recsae_core") for t in ts if t.startswith("service")
    ]
    assert not bad, "\n".join(bad)
