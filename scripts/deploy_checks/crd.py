"""`crd`: custom resources against the KubeRay CRDs vendored in deploy/kuberay/crds/, as strictly as the API server
with strict field validation (`kubectl apply --validate=strict`)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .common import ROOT, Loader, ToolMissing, UniqueKeyLoader
from .schema_errors import schema_problems

CRD_DIR = ROOT / "deploy" / "kuberay" / "crds"


def _strict_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural OpenAPI v3 schema as a JSON schema that refuses what the API server would prune.

    An object schema without `x-kubernetes-preserve-unknown-fields` or `additionalProperties` keeps only its declared
    properties: the API server drops the rest, and strict field validation reports them as unknown fields.
    `nullable: true` becomes a `null` type (JSON schema has no `nullable`); the flag itself is kept for pruning.
    """
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: _strict_schema(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict_schema(s) for s in out[key]]
    is_object = out.get("type") == "object"
    if out.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if is_object and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        if out.get("x-kubernetes-embedded-resource"):
            # An embedded object always carries its own type and metadata, declared or not.
            out["properties"] = {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                **out.get("properties", {}),
            }
        out["additionalProperties"] = False
    return out


def _normalize(value: Any, schema: dict[str, Any], path: str, problems: list[str]) -> Any:
    """What the API server does before validating: drop nulls of non-nullable fields, then apply defaults.

    Also checks what jsonschema cannot: entries of `x-kubernetes-list-type: map` lists unique by their keys (after
    defaulting, as a key such as a port's `protocol` is often defaulted), items of `set` lists unique.
    """
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key in list(value):
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is None:
                continue  # an unknown field, reported by the schema (strict decoding sees it before any pruning)
            if value[key] is None and not sub.get("nullable"):
                del value[key]
            else:
                value[key] = _normalize(value[key], sub, f"{path}.{key}" if path else key, problems)
        for key, sub in props.items():
            if key not in value and "default" in sub:
                at = f"{path}.{key}" if path else key
                value[key] = _normalize(copy.deepcopy(sub["default"]), sub, at, problems)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [_normalize(v, schema["items"], f"{path}[{i}]", problems) for i, v in enumerate(value)]
        list_type = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            if list_type == "map" and isinstance(item, dict):
                ident = json.dumps({k: item.get(k) for k in keys}, sort_keys=True)
            elif list_type == "set":
                ident = json.dumps(item, sort_keys=True)
            else:
                continue
            if ident in seen:
                problems.append(
                    f"{path}[{i}]: duplicate entry {ident} (also at [{seen[ident]}]; list-type {list_type})"
                )
            seen.setdefault(ident, i)
    return value


@dataclass
class CrdVersion:
    kind: str
    api_version: str
    schema: dict[str, Any]
    validator: jsonschema.protocols.Validator
    deprecation: str | None  # the API server's warning for a deprecated version


@dataclass
class CrdSet:
    versions: dict[tuple[str, str], CrdVersion] = field(default_factory=dict)  # (apiVersion, kind)
    groups: set[str] = field(default_factory=set)
    object_meta: jsonschema.protocols.Validator | None = None


def _object_meta_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' strict ObjectMeta schema, as shipped by kubernetes-validate (a CRD only says `type: object`)."""
    try:
        from kubernetes_validate import utils as kv
        from referencing import Registry, Resource
    except ImportError as e:
        raise ToolMissing(f"{e.name} is not installed: run scripts/install_tools.sh") from e
    version = kv.latest_version()
    defs = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Resource.from_contents(defs) @ Registry()
    ref = f"{defs['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


def load_crds(directory: Path) -> CrdSet:
    crds = CrdSet(object_meta=_object_meta_validator())
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ToolMissing(f"no CRD (*.yaml) in {directory}")
    for path in files:
        for crd in yaml.load_all(path.read_text(), Loader=Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            crds.groups.add(group)
            for version in crd["spec"]["versions"]:
                if not version.get("served", True):
                    continue
                schema = _strict_schema(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}  # checked against ObjectMeta on its own
                api_version = f"{group}/{version['name']}"
                # OpenAPI v3.0 schemas follow draft 4 (boolean exclusiveMaximum, no const).
                validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
                warning = version.get("deprecationWarning") or f"{api_version} {kind} is deprecated"
                crds.versions[(api_version, kind)] = CrdVersion(
                    kind, api_version, schema, validator, warning if version.get("deprecated") else None
                )
    return crds


def validate_custom_resource(doc: dict[str, Any], crd: CrdVersion, crds: CrdSet) -> list[str]:
    problems: list[str] = []
    doc = _normalize(copy.deepcopy(doc), crd.schema, "", problems)
    problems += schema_problems(crd.validator, doc)
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        problems.append("metadata: required")
    else:
        assert crds.object_meta is not None
        problems += schema_problems(crds.object_meta, meta, "metadata")
        if not meta.get("name") and not meta.get("generateName"):
            problems.append("metadata.name: required")
    return problems


def check_crd(args: argparse.Namespace) -> int:
    crds = load_crds(Path(args.crds))
    failed = False
    for name in args.manifests:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
        try:
            docs = [d for d in yaml.load_all(text, Loader=UniqueKeyLoader) if d]
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            print(f"ERROR {name}: line {mark.line + 1 if mark else '?'}: {e.problem or e.context}")
            failed = True
            continue
        if not all(isinstance(d, dict) for d in docs):
            print(f"ERROR {name}: every YAML document must be an object (a Kubernetes resource)")
            failed = True
            continue
        skipped = 0
        for doc in docs:
            api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            crd = crds.versions.get((api_version, kind))
            label = f"{kind}/{(doc.get('metadata') or {}).get('name')}"
            if crd is None:
                if api_version.split("/")[0] in crds.groups:
                    served = sorted(f"{v}" for v, k in crds.versions if k == kind)
                    print(f"ERROR {name} {label}: {api_version} {kind} is not served by the vendored CRDs {served}")
                    failed = True
                else:
                    skipped += 1
                continue
            if crd.deprecation:
                print(f"WARNING {name} {label}: {crd.deprecation}")
            problems = validate_custom_resource(doc, crd, crds)
            for p in problems:
                print(f"ERROR {name} {label}: {p}")
            failed |= bool(problems)
            if not problems:
                print(f"OK {name} {label} ({api_version}, strict)")
        for kind in args.expect:
            if not any(d.get("kind") == kind for d in docs):
                print(f"ERROR {name}: no {kind} in the file")
                failed = True
        if skipped:
            print(f"   {name}: {skipped} object(s) of other groups not checked here")
    return 1 if failed else 0
