"""The language-model labeler on Ray (issue 19): on a local cluster of two worker CPUs, joined by address from a
process of its own, chunks of latents are labelled by Ray actors whose clients send their requests, from two worker
processes, to the one real llama.cpp server (SmolLM2, through a counting proxy). The labels equal the one-process
ones; the usage of the workers is summed on the driver; a second run is served entirely from the cache the workers
shared, bit for bit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from _ray_cluster import in_a_fresh_process
from test_llm_client import FlakyProxy, llama_server  # noqa: F401 (llama_server: a fixture)

from recsae_core.concepts.llm_client import LLMClient, LLMOptions
from recsae_core.concepts.llm_labeler import llm_label, prerender
from recsae_core.concepts.samples import LatentSamples
from recsae_core.concepts.scoring import Labelled

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MOVIES = (
    "Alien (Horror|Sci-Fi, 1979)", "Toy Story (Animation|Children's, 1995)", "Heat (Action|Crime, 1995)",
    "Fargo (Crime|Drama, 1996)", "Babe (Children's|Comedy, 1995)", "Scream (Horror|Thriller, 1996)",
    "Casablanca (Drama|Romance, 1942)", "Aladdin (Animation|Musical, 1992)", "Se7en (Crime|Thriller, 1995)",
    "Vertigo (Mystery|Thriller, 1958)", "Jaws (Action|Horror, 1975)", "Emma (Comedy|Romance, 1996)",
)  # fmt: skip
SHOWN = 1
"""One describing sample shown per latent: 1 explanation + 6 yes/no questions per latent keep the prompts short."""
LATENTS = [
    LatentSamples(j, np.array([7 * n, 7 * n + 1]), *(np.array([7 * n + k]) for k in range(2, 7)))
    for n, j in enumerate((42, 3))
]
"""Two latents (a chunk for each worker; not in latent order), seven samples each, none shared: every request is a
new one (no cache hit within a run)."""
LEVELS = {(s.latent, int(s.describe[0])): 10 - n for n, s in enumerate(LATENTS)}
CALLS = len(LATENTS) * (1 + 2 * SHOWN + 4)

DRIVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_distributed_llm import LATENTS, LEVELS, SHOWN, as_json, render
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.concepts.llm_client import LLMClient, LLMOptions
from recsae_core.concepts.llm_labeler import llm_label, llm_label_on_ray
url, cache, address, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
config, runs = RayConfig(address=address, workers=2), {}
for run in ("first", "second"):
    with LLMClient(LLMOptions(url=url, concurrency=1, cache_dir=cache)) as client:
        client.check()
        if run == "first":
            on_ray = llm_label_on_ray(client, LATENTS, render, LEVELS, SHOWN, config)
            labels, workers = on_ray.labels, list(on_ray.workers)
        else:  # the catalog's way in
            labels = llm_label(client, LATENTS, render, LEVELS, SHOWN, progress=False, ray_config=config)
        runs[run] = {"labels": as_json(labels), "usage": client.usage.as_dict()}
runs["workers"] = workers
(out / "runs.json").write_text(json.dumps(runs))
"""


def render(sample: int, level: int | None) -> str:
    """A short sample text, a different pair of recent movies for each of the first 132 samples."""
    first = sample % len(MOVIES)
    second = (first + 1 + sample // len(MOVIES)) % len(MOVIES)
    text = f"Recent items: {MOVIES[first]}; {MOVIES[second]}\nRecommended next: {MOVIES[(sample * 5 + 3) % 12]}"
    return text if level is None else f"{text}\nActivation level: {level}"


def as_json(labels: dict[int, Labelled]) -> dict[str, object]:
    """Labels as JSON reads them back (floats exactly: JSON writes their shortest round-trip form)."""
    return json.loads(json.dumps({str(latent): label for latent, label in labels.items()}))


def test_prerendered_samples_are_every_text_the_labeler_asks_for():
    rendered = prerender(LATENTS, render, LEVELS, SHOWN)
    assert len(rendered.texts) == len(set(rendered.texts.values())) == CALLS  # one text per request, all different
    asked: list[tuple[int, int | None]] = []
    for s in LATENTS:
        asked += [(int(s.describe[0]), LEVELS[(s.latent, int(s.describe[0]))])]
        asked += [(int(i), None) for group in (s.describe[1:], *s[2:]) for i in group]
    assert sorted(rendered.texts, key=str) == sorted(asked, key=str)
    assert all(rendered(*key) == render(*key) for key in asked)


def test_llm_labels_on_ray_equal_the_one_process_ones_and_share_the_cache(llama_server, cluster, tmp_path):  # noqa: F811
    with LLMClient(LLMOptions(url=llama_server, concurrency=1)) as client:
        client.check()
        expected = as_json(llm_label(client, LATENTS, render, LEVELS, SHOWN, progress=False))
    assert list(expected) == [str(s.latent) for s in LATENTS]
    proxy = FlakyProxy(llama_server, failures=0)  # the one endpoint every worker calls, counting what reaches it
    try:
        # A relative cache folder (from the driver's folder): the workers, started elsewhere, must write the same.
        cache = os.path.relpath(tmp_path / "llm_cache", REPO)
        in_a_fresh_process([sys.executable, "-c", DRIVER, proxy.url, cache, cluster, str(tmp_path)])
    finally:
        proxy.close()
    runs = json.loads((tmp_path / "runs.json").read_text())
    first, second = runs["first"], runs["second"]
    assert len(set(runs["workers"])) == 2  # requests from two Ray worker processes
    assert proxy.forwarded == CALLS  # all of them to the one endpoint, and none in the cached rerun
    assert first["labels"] == expected and list(first["labels"]) == list(expected)  # the latents' order too
    usage = first["usage"]  # summed over the workers' clients
    assert usage["calls"] == usage["answers_timed"] == CALLS and usage["cached"] == 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0 and usage["server_seconds"] > 0
    assert len(list((tmp_path / "llm_cache").glob("*/*.json"))) == CALLS
    assert not list((tmp_path / "llm_cache").glob("*/*.tmp"))  # every entry renamed into place
    # The rerun: every answer from the files the workers wrote, each costing what it cost when first fetched.
    assert second["labels"] == first["labels"]
    again = second["usage"]
    assert again["cached"] == again["calls"] == CALLS and again["server_seconds"] == 0
    assert {k: again[k] for k in ("prompt_tokens", "completion_tokens", "answer_seconds")} == {
        k: usage[k] for k in ("prompt_tokens", "completion_tokens", "answer_seconds")
    }
