"""Record what a bundle serves over HTTP for a fixed list of requests, as one JSON file.

A refactor that must not change behaviour is checked by recording on the old and the new code with the same bundle
and comparing the files byte for byte (docs/architecture.md). The requests cover plain, history, explain and
steered requests (every op and unit), bundled policies, and refusals; the service runs as `recsae serve` runs it
(local Ray, Ray Serve, one replica), on free loopback ports.

    python scripts/record_responses.py BUNDLE_DIR OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service.local import free_port, start_local

OPS = ("ablate", "pin", "nudge", "scale")
VALUES = (0.0, 2.0, -1.5, 0.5)
UNITS = ("std", "max", "raw")


def requests_for(users: list[str], items: list[str], concepts: list[str]) -> list[dict[str, Any]]:
    """The fixed request list, from the bundle's own ids and concept names."""
    out: list[dict[str, Any]] = [{"user_id": u, "k": 10} for u in users[:40]]
    out += [{"user_id": u, "k": 25, "exclude_seen": False, "explain": True} for u in users[40:50]]
    out += [{"history": items[i * 7 : i * 7 + 12], "k": 10, "explain": True} for i in range(10)]
    for j, user in enumerate(users[50:70]):
        op = OPS[j % 4]
        edit: dict[str, Any] = {"concept": concepts[j % len(concepts)], "op": op}
        if op != "ablate":
            edit["value"] = VALUES[j % 4]
        if op in ("pin", "nudge"):
            edit["unit"] = UNITS[j % 3]
        second = {"latent": 3, "op": "nudge", "value": 1.0, "unit": "std"}
        out.append({"user_id": user, "k": 10, "explain": True, "steering": {"edits": [edit, second]}})
    out += [{"user_id": u, "k": 10, "explain": True, "steering": {"policy": "tail-boost"}} for u in users[70:80]]
    out.append({"user_id": users[0], "steering": {"policy": "broken"}})
    out.append({"user_id": "no-such-user"})
    out.append({"user_id": users[0], "steering": {"edits": [{"concept": "dram", "op": "ablate"}]}})
    return out


def record(bundle: Path, out: Path) -> int:
    users = [str(u) for u in json.loads((bundle / "users.json").read_text())["ids"]]
    items = [str(i) for i in json.loads((bundle / "items.json").read_text())["ids"]]
    service = start_local(bundle, port=free_port(), metrics_port=free_port())
    try:
        url = service.url
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        concepts = httpx.get(f"{url}/v1/concepts", timeout=30).json()
        names = [c["name"] for c in concepts["concepts"]][:6] or ["no-concept"]
        recorded: dict[str, Any] = {"recommend": [], "get": [], "concepts": concepts}
        for body in requests_for(users, items, names):
            answer = httpx.post(f"{url}/v1/recommend", json=body, timeout=30)
            recorded["recommend"].append({"req": body, "status": answer.status_code, "body": answer.json()})
        for query in (
            f"user_id={users[1]}&k=5",
            f"user_id={users[2]}&k=5&ablate=12,40",
            f"user_id={users[3]}&explain=true",
        ):
            answer = httpx.get(f"{url}/v1/recommend?{query}", timeout=30)
            recorded["get"].append({"q": query, "status": answer.status_code, "body": answer.json()})
        recorded["concept_detail"] = [httpx.get(f"{url}/v1/concepts/{n}", timeout=30).json() for n in names[:3]]
        recorded["policies"] = httpx.get(f"{url}/v1/policies", timeout=30).json()
    finally:
        service.stop()
    out.write_text(json.dumps(recorded, indent=1, sort_keys=True))
    print(f"record_responses: {len(recorded['recommend'])} requests -> {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python scripts/record_responses.py BUNDLE_DIR OUT.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(record(Path(sys.argv[1]), Path(sys.argv[2])))
