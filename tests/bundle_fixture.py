"""A small real bundle for tests and smoke runs: SASRec on ML-100K (1 epoch), a 256-latent TopK SAE, a concept
catalog named by each latent's most raised genre, and two policies (one usable, one deliberately broken).

Built with the same recsae_core functions the pipeline uses, but fast (~40 s on 2 cores). Set
RECSAE_TEST_BUNDLE to reuse an existing bundle instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from recsae_core.bundle.export import contents_from_run
from recsae_core.bundle.format import verify_bundle, write_bundle
from recsae_core.common.errors import RecsaeError
from recsae_core.common.layout import STATS_FILE
from recsae_core.probe.collect import collect, load_activations
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.run import load_run, train_step
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.stats import latent_statistics, save_stats
from recsae_core.sae.train import train_sae

ENV = "RECSAE_TEST_BUNDLE"


def _catalog(sae, stats, emb: np.ndarray, genres: list[list[str]], popularity: np.ndarray) -> tuple[dict, str]:
    """Concepts for every live latent, and the name of the one whose direction most favours popular items."""
    directions = sae.W_dec.detach().numpy() @ emb.T  # (n_latents, n_items)
    log_pop = np.log1p(popularity)
    concepts, best, best_corr = [], "", -np.inf
    for latent in np.flatnonzero(stats.frequency.numpy() > 0):
        top = np.argsort(-directions[latent])[:20]
        counts = Counter(g for i in top for g in genres[i])
        genre = counts.most_common(1)[0][0].lower() if counts else "misc"
        name = f"{genre}-{latent}"
        concepts.append({"latent": int(latent), "name": name, "description": f"raises {genre} titles"})
        corr = float(np.corrcoef(directions[latent], log_pop)[0, 1])
        if corr > best_corr:
            best, best_corr = name, corr
    return {"concepts": concepts}, best


def build_test_bundle(out: Path, n_latents: int = 256, k: int = 8, sae_epochs: int = 5) -> Path:
    """Build (or reuse, if `out` already holds a verified bundle, or $RECSAE_TEST_BUNDLE is set) a test bundle."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    try:
        verify_bundle(out)
        return out
    except RecsaeError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Trained as the pipeline trains (and written as its contract), then read back as every later step reads it.
        train_step(root / "run", "ml-100k", "sasrec", "recbole", TrainConfig(epochs=1, patience=1, progress=False))
        ctx = load_run(root / "run")
        activations, _, _ = load_activations(collect(ctx, progress=False).folder)
        sample = activations[torch.randperm(len(activations), generator=torch.Generator().manual_seed(0))[:20000]]
        # Every epoch scored on training FVU, no tolerance, plateau drops, time limit or dead-latent rule: fast.
        config = SAETrainConfig(
            n_latents=n_latents, k=k, lr=2e-3, batch_size=512, epochs=sae_epochs, patience=sae_epochs,
            select_every=1, select_tolerance=0.0, lr_drops=0, max_minutes=0, max_dead=1.0, progress=False,
        )  # fmt: skip
        sae = train_sae(sample, config).sae
        stats = latent_statistics(sae, activations)
        sae.save(root / "sae")
        save_stats(stats, root / "sae" / STATS_FILE)
        contents, parity = contents_from_run(ctx, root / "sae", root)
        catalog, popular = _catalog(sae, stats, contents.item_embeddings, contents.genres, contents.popularity)
        (root / "catalog.json").write_text(json.dumps(catalog))
        (root / "policies").mkdir()
        tail_boost = {"description": "lower the most popularity-aligned concept",
                      "edits": [{"concept": popular, "op": "nudge", "value": -2.0, "unit": "std"}]}  # fmt: skip
        (root / "policies" / "tail-boost.json").write_text(json.dumps(tail_boost))
        broken = {
            "description": "refers to a concept this bundle lacks",
            "edits": [{"concept": "nope", "op": "ablate"}],
        }
        (root / "policies" / "broken.json").write_text(json.dumps(broken))
        contents.catalog_path = root / "catalog.json"
        contents.policy_paths = sorted((root / "policies").glob("*.json"))
        write_bundle(contents, out, parity=parity)
    return out


if __name__ == "__main__":
    import sys

    print(build_test_bundle(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/recsae-test-bundle")))
