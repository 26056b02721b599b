"""What the validators share: the repository root, the missing-tool error and YAML loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ToolMissing(Exception):
    """A package or binary the check needs is not installed (exit status 2, not a validation failure)."""


class UniqueKeyLoader(Loader):  # type: ignore[misc, valid-type]
    """Refuses duplicate keys: the API server's strict decoding does, PyYAML would silently keep the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate field {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)
