"""The quick start's last step: serve a bundle, ask for one plain and one steered ranking, print both, stop."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from recsae_core.bundle.format import load_bundle
from recsae_core.common.errors import RecsaeError
from service.local import free_port, start_local


def show(title: str, payload: dict) -> None:
    print(f"\n{title}")
    for item in payload["items"]:
        moved = f"  (was #{item['original_rank']})" if "original_rank" in item else ""
        print(f"  {item['rank']:>2}. {item['title'][:60]:<60} score {item['score']:8.4f}{moved}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/demo_service.py BUNDLE_DIR", file=sys.stderr)
        return 2
    bundle_dir = Path(argv[0]).resolve()
    try:
        bundle = load_bundle(bundle_dir)
    except RecsaeError as err:
        print(f"recsae: error: {err}", file=sys.stderr)
        return 2
    user = bundle.user_ids[0]
    service = start_local(bundle_dir, port=free_port(), metrics_port=free_port())
    try:
        print(f"recsae: serving {bundle_dir} at {service.url}")
        with httpx.Client(base_url=service.url, timeout=30) as client:
            plain = client.post("/v1/recommend", json={"user_id": user, "k": 10, "explain": True}).json()
            top = plain["explanation"]["latents"][:2]
            steer = {"edits": [{"latent": latent["latent"], "op": "ablate"} for latent in top]}
            steered = client.post("/v1/recommend", json={"user_id": user, "k": 10, "steering": steer}).json()
        show(f"user {user}: the original model's top 10", plain)
        names = ", ".join(latent.get("concept") or f"latent {latent['latent']}" for latent in top)
        show(f"user {user}: top 10 with the two most active concepts ablated ({names})", steered)
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
