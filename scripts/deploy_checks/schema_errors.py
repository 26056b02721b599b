"""jsonschema's errors as one line each, in the API server's words where they differ (crd and dashboard checks)."""

from __future__ import annotations

import json
import typing
from typing import Any

import jsonschema


def _dotted(parts: typing.Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _leaf_errors(e: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """The errors that say what is wrong: inside a union (anyOf/oneOf), those of the branch the value came closest
    to (fewest errors), e.g. a panel with a typo against Panel rather than against RowPanel."""
    if e.validator not in ("anyOf", "oneOf") or not e.context or e.schema.get("x-kubernetes-int-or-string"):
        return [e]
    branches: dict[Any, list[jsonschema.ValidationError]] = {}
    for sub in e.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    best = min(branches.values(), key=len)
    if all(sub.absolute_path == e.absolute_path and sub.validator in ("type", "enum", "const") for sub in best):
        return [e]  # the value itself has the wrong type for every branch: one line says so
    return [leaf for sub in best for leaf in _leaf_errors(sub)]


def schema_problems(validator: jsonschema.protocols.Validator, instance: Any, prefix: str = "") -> list[str]:
    """jsonschema's errors in the API server's words where they differ (unknown field, int-or-string)."""
    out = []
    errors = [leaf for e in validator.iter_errors(instance) for leaf in _leaf_errors(e)]
    for e in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        where = _dotted([*([prefix] if prefix else []), *e.absolute_path])
        if e.validator == "additionalProperties" and e.validator_value is False and isinstance(e.instance, dict):
            known = e.schema.get("properties", {})
            for key in sorted(k for k in e.instance if k not in known):
                out.append(f'unknown field "{where}.{key}"' if where != "<root>" else f'unknown field "{key}"')
        elif e.validator == "anyOf" and e.schema.get("x-kubernetes-int-or-string"):
            out.append(f"{where}: {e.instance!r} must be an integer or a string")
        elif e.validator in ("anyOf", "oneOf"):
            alternatives = "; ".join(sorted({sub.message for sub in e.context}))
            out.append(f"{where}: {_short(e.instance)} matches none of: {alternatives[:300]}")
        else:
            out.append(f"{where}: {e.message[:300]}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
