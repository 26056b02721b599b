"""JSON schemas of grafana-foundation-sdk's typed models, the `dashboard` check's reference."""

from __future__ import annotations

import enum
import types
import typing
from dataclasses import dataclass
from typing import Any

import jsonschema

from .common import ToolMissing

# Fields Grafana's own UI writes that the SDK's models lack; refusing them would refuse every dashboard exported
# from Grafana with a query variable. Keep this list to what Grafana itself emits.
GRAFANA_EXTRA_FIELDS: dict[str, dict[str, Any]] = {
    "dashboard.VariableModel": {"definition": {"type": "string"}},  # the query, as the variable list shows it
}


class _Mark:
    def __init__(self, attr: str) -> None:
        self.attr = attr


class ModelSchema:
    """JSON schema of grafana-foundation-sdk's generated model classes (cog), read from the classes themselves.

    A model's JSON keys come from its own `to_json` (run on an instance whose attributes are markers), its types
    from its type hints. The fields `to_json` writes even when unset are the required ones, `Optional` ones among
    them nullable (as Grafana's schema says: a threshold's `value: null`); with `require=False` nothing is required,
    for the panel plugins' options, whose missing fields Grafana fills in from the plugin's defaults.
    """

    def __init__(self, require: bool = True) -> None:
        self.require = require
        self.defs: dict[str, Any] = {}

    @staticmethod
    def _fields(cls: type) -> tuple[dict[str, Any], dict[str, str], set[str]]:
        hints = typing.get_type_hints(cls)
        probe = cls.__new__(cls)
        for attr in hints:
            setattr(probe, attr, _Mark(attr))
        keys = {v.attr: k for k, v in probe.to_json().items() if isinstance(v, _Mark)}
        missing = set(hints) - set(keys)
        if missing:
            raise RuntimeError(f"{cls.__qualname__}.to_json() does not write {sorted(missing)}: unsupported SDK")
        for attr in hints:
            setattr(probe, attr, None)
        return hints, keys, set(probe.to_json())

    def schema(self, tp: Any, nullable: bool = False) -> dict[str, Any]:
        from grafana_foundation_sdk.cog import variants

        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            out = self.schema(inner[0]) if len(inner) == 1 else self._union(inner)
            return {"anyOf": [out, {"type": "null"}]} if nullable and len(inner) < len(args) else out
        if origin is typing.Literal:
            return {"enum": list(args)}
        if origin is list:
            return {"type": "array", "items": self.schema(args[0])}
        if origin is dict:
            return {"type": "object", "additionalProperties": self.schema(args[1])}
        simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
        if tp in simple:
            return {"type": simple[tp]}
        if tp in (object, typing.Any) or tp is variants.Dataquery:
            return {}  # plugin-defined: options, field-config custom and queries are checked per plugin
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return {"enum": [m.value for m in tp]}
        if isinstance(tp, type) and hasattr(tp, "to_json"):
            name = f"{tp.__module__.rsplit('.', 1)[-1]}.{tp.__qualname__}"
            if name not in self.defs:
                self.defs[name] = {}  # recursion guard (Snapshot holds a Dashboard)
                hints, keys, written = self._fields(tp)
                required = written if self.require else set()
                props = {keys[a]: self.schema(h, nullable=keys[a] in written) for a, h in hints.items()}
                props.update(GRAFANA_EXTRA_FIELDS.get(name, {}))
                self.defs[name] = {"type": "object", "additionalProperties": False, "properties": props}
                if required:
                    self.defs[name]["required"] = sorted(required)
            return {"$ref": f"#/$defs/{name}"}
        raise RuntimeError(f"no JSON schema for the SDK type {tp!r}")

    def _union(self, members: list[Any]) -> dict[str, Any]:
        """Models told apart by a literal field (a row panel's `type: "row"`) the way the SDK's decoder does, so
        that errors come from the model the value is meant to be, not from a failed match against every one."""
        tagged, untagged = [], []
        for m in members:
            tag = None
            if isinstance(m, type) and hasattr(m, "to_json"):
                _, keys, _ = self._fields(m)
                for attr, hint in typing.get_type_hints(m).items():
                    if typing.get_origin(hint) is typing.Literal and len(typing.get_args(hint)) == 1:
                        tag = (keys[attr], typing.get_args(hint)[0])
            (tagged if tag else untagged).append((tag, m))
        if not tagged or len(untagged) > 1:
            return {"anyOf": [self.schema(m) for m in members]}
        out = self.schema(untagged[0][1]) if untagged else {"anyOf": [self.schema(m) for m in members]}
        for (key, value), m in reversed(tagged):
            test = {"properties": {key: {"const": value}}, "required": [key]}
            out = {"if": test, "then": self.schema(m), "else": out}
        return out

    def validator(self, cls: type) -> jsonschema.protocols.Validator:
        root = self.schema(cls)
        return jsonschema.Draft202012Validator({**root, "$defs": self.defs})


@dataclass
class GrafanaModels:
    dashboard: jsonschema.protocols.Validator
    options: dict[str, jsonschema.protocols.Validator]  # panel type -> its Options
    custom: dict[str, jsonschema.protocols.Validator]  # panel type -> its FieldConfig (fieldConfig.defaults.custom)
    queries: dict[str, jsonschema.protocols.Validator]  # datasource type -> its Dataquery
    sdk_version: str


def grafana_models() -> GrafanaModels:
    try:
        from importlib.metadata import version

        from grafana_foundation_sdk.cog import plugins, runtime
        from grafana_foundation_sdk.models import dashboard
    except ImportError as e:
        raise ToolMissing(f"{e.name} is not installed: run scripts/install_tools.sh") from e
    plugins.register_default_plugins()
    registry = runtime.Runtime()
    loose = ModelSchema(require=False)
    strict = ModelSchema(require=True)

    def models(hooks: dict[str, Any], schema: ModelSchema) -> dict[str, jsonschema.protocols.Validator]:
        # The registry holds each model's bound `from_json` classmethod; a plain function instead decodes a union
        # of several query kinds (CloudWatch, server-side expressions), which stays unchecked.
        return {
            t: schema.validator(h.__self__) for t, h in hooks.items() if isinstance(getattr(h, "__self__", None), type)
        }

    panels = registry.panelcfg_variants.items()
    return GrafanaModels(
        dashboard=ModelSchema().validator(dashboard.Dashboard),
        options=models({t: c.options_from_json_hook for t, c in panels}, loose),
        custom=models({t: c.field_config_from_json_hook for t, c in panels}, loose),
        queries=models({t: c.from_json_hook for t, c in registry.dataquery_variants.items()}, strict),
        sdk_version=version("grafana-foundation-sdk"),
    )
