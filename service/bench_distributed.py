"""The distributed offline steps of `recsae bench scale` against their worker count: SAE training (DDP on Ray Train)
and the concept catalog's distributed parts (latent statistics and every latent's top samples on Ray Data), each with
1 and 2 workers, beside the one-process figure.

SAE runs share one config (same seed, same sample budget counted in global samples), so 1 and 2 workers do the same
work; each reached SAE is scored on one fixed held-out sample (FVU, dead share), so "at equal FVU" can be checked.
A part whose distributed function is not available here reports {"skipped": why} instead of failing the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from recsae_core.common.ray_cluster import RayConfig
from recsae_core.concepts.catalog import CatalogOptions, top_samples
from recsae_core.probe.collect import load_activations
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.runtime import SAERuntime
from recsae_core.sae.stats import latent_statistics
from recsae_core.sae.train import SAETrainResult, evaluate_reconstruction, train_sae

WORKERS = (1, 2)
EVAL_ROWS = 100_000
"""Rows of the fixed sample every SAE is scored on."""


def _ratio(faster: float, slower: float) -> float | None:
    return round(faster / slower, 3) if slower > 0 else None


def fixed_sample(h: torch.Tensor, seed: int, rows: int = EVAL_ROWS) -> torch.Tensor:
    """The held-out rows every SAE of the benchmark is scored on (a seeded draw)."""
    order = torch.randperm(len(h), generator=torch.Generator().manual_seed(seed))
    return h[order[: min(rows, len(h))]]


def _sae_figures(result: SAETrainResult, sample: torch.Tensor) -> dict[str, Any]:
    recon = evaluate_reconstruction(result.sae.cpu().eval(), sample)
    return {"samples_seen": result.samples_seen, "seconds": round(result.seconds, 2),
            "samples_per_second": round(result.samples_per_second, 1), "epochs": result.epochs_trained,
            "stopped_by": result.stopped_by, "fvu": round(recon["fvu"], 5),
            "dead_fraction": round(recon["dead_fraction"], 4)}  # fmt: skip


def sae_scaling(probe: Path, config: SAETrainConfig, address: str, log: Callable[[str], None] = print) -> dict:
    """samples/s and the reached FVU in one process and with each of WORKERS DDP workers; `ratio`: 2 workers over 1
    in samples/s, `fvu_gap`: 2 workers' FVU over 1's minus 1."""
    try:
        from recsae_core.sae.on_ray import train_sae_on_ray
    except ImportError as err:
        return {"skipped": f"SAE training on Ray is not available here ({err})"}
    h, _, _ = load_activations(probe)
    sample = fixed_sample(h, config.seed)
    log(f"sae: one process, {config.max_samples} samples")
    out: dict[str, Any] = {"budget_samples": config.max_samples, "n_latents": config.n_latents, "k": config.k,
                           "scored_on_rows": len(sample), "one_process": _sae_figures(train_sae(h, config), sample),
                           "ray": {}}  # fmt: skip
    del h
    for n in WORKERS:
        log(f"sae: {n} DDP worker(s), {config.max_samples} samples")
        result = train_sae_on_ray(probe, config, RayConfig(address=address, workers=n))
        out["ray"][str(n)] = _sae_figures(result, sample)
    one, two = out["ray"]["1"], out["ray"]["2"]
    out["ratio"] = _ratio(two["samples_per_second"], one["samples_per_second"])
    out["fvu_gap"] = round(two["fvu"] / one["fvu"] - 1, 4) if one["fvu"] > 0 else None
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return round(time.perf_counter() - t0, 2)


def catalog_scaling(sae_folder: Path, probe: Path, address: str, log: Callable[[str], None] = print) -> dict:
    """Wall time of the catalog's distributed parts in one process and with each of WORKERS workers: the latent
    statistics, and every latent's top samples (one per user; the catalog's coherence units). `ratio`: 1 worker's
    time over 2 workers'."""
    try:
        from recsae_core.sae.stats_on_ray import latent_statistics_on_ray
    except ImportError as err:
        return {"skipped": f"latent statistics on Ray are not available here ({err})"}
    sae = TopKSAE.load(sae_folder).cpu().eval()
    runtime = SAERuntime.from_model(sae)
    h, users, _ = load_activations(probe)
    top_n = CatalogOptions().coherence_top
    parts: dict[str, Callable[[RayConfig | None], Any]] = {
        "statistics": lambda ray: latent_statistics_on_ray(sae, probe, ray) if ray else latent_statistics(sae, h),
        "top_samples": lambda ray: top_samples(runtime, h.numpy(), users, top_n, probe, ray, progress=False),
    }
    out: dict[str, Any] = {"samples": len(h), "top_n": top_n}
    for name, run in parts.items():
        log(f"catalog: {name}, one process and {' and '.join(map(str, WORKERS))} worker(s)")
        figures: dict[str, Any] = {"one_process_s": _timed(lambda run=run: run(None)), "ray_s": {}}
        for n in WORKERS:
            ray = RayConfig(address=address, workers=n)
            figures["ray_s"][str(n)] = _timed(lambda run=run, ray=ray: run(ray))
        figures["ratio"] = _ratio(figures["ray_s"]["1"], figures["ray_s"]["2"])
        out[name] = figures
    total = {str(n): sum(out[name]["ray_s"][str(n)] for name in parts) for n in WORKERS}
    out["ray_s"] = {n: round(s, 2) for n, s in total.items()}
    out["ratio"] = _ratio(total["1"], total["2"])
    return out
