"""`recsae bench scale` (issue 19): the synthetic two-tower model, the bundles over larger catalogues, the report's
parts and goals, the refusals of bad options, and the command end to end at a small size (its own local Ray cluster,
in a process of its own: Ray keeps its auth mode per process, see tests/_ray_cluster.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli import cli_refusal

from recsae_core.bundle.format import load_bundle
from recsae_core.common.layout import RunLayout
from recsae_core.recommenders.synthetic import CHUNK, SyntheticSpec, item_matrix, user_embeddings
from recsae_core.sae.config import SAETrainConfig
from service.bench_scale import goals, prepare_run, prepare_sae
from service.cli import main

SMALL = SyntheticSpec(n_users=400, n_items=100, eval_users=200, seed=3)
SMALL_SAE = SAETrainConfig(n_latents=64, k=4, max_samples=4000, progress=False)


def test_catalogues_are_prefixes_of_one_seeded_matrix() -> None:
    big = item_matrix(SMALL, CHUNK + 10)  # past one generator's chunk
    assert np.array_equal(big[:100], item_matrix(SMALL))
    assert np.array_equal(item_matrix(SMALL, CHUNK + 5), big[: CHUNK + 5])
    assert not np.array_equal(item_matrix(SyntheticSpec(n_items=100, seed=4)), big[:100])
    users, topics = user_embeddings(SMALL)
    assert users.shape == (400, 64) and topics.shape == (400,) and np.isfinite(users).all()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """The small synthetic model imported, probed and its SAE trained, as the benchmark prepares it."""
    folder = tmp_path_factory.mktemp("scale") / "model"
    metrics = prepare_run(SMALL, folder, log=lambda _: None)
    # The synthetic log gives the model something to rank: far above popularity on its own test items.
    assert metrics["n_users"] == 400 and metrics["test"]["ndcg@10"] > 5 * metrics["popularity_baseline_test"]["ndcg@10"]
    prepare_sae(folder / "run", SMALL_SAE, log=lambda _: None)
    return folder / "run"


def test_a_rerun_reuses_the_import_and_the_sae(small_run: Path) -> None:
    layout = RunLayout(small_run)
    before = (layout.recommender / "metrics.json").stat().st_mtime_ns, (layout.sae / "metrics.json").stat().st_mtime_ns
    lines: list[str] = []
    prepare_run(SMALL, small_run.parent, log=lines.append)
    prepare_sae(small_run, SMALL_SAE, log=lines.append)
    after = (layout.recommender / "metrics.json").stat().st_mtime_ns, (layout.sae / "metrics.json").stat().st_mtime_ns
    assert before == after and "sae: up to date, skipped" in lines[-1]


def test_catalogue_bundles_extend_the_run(small_run: Path, tmp_path: Path) -> None:
    from service.bench_scale_serve import write_catalog_bundles

    bundles = write_catalog_bundles(small_run, SMALL, [100, 1000], tmp_path)
    small, large = load_bundle(bundles[100]), load_bundle(bundles[1000])
    assert (small.n_items, large.n_items) == (100, 1000)
    assert np.array_equal(large.item_embeddings, item_matrix(SMALL, 1000))
    assert large.items["ids"][:100] == small.items["ids"] and large.items["ids"][100] == "i100"
    assert large.items["popularity"][100:] == [0] * 900 and sum(large.items["popularity"]) > 0
    # The same users, inputs, seen items (all among the first 100) and representation model.
    assert large.user_ids == small.user_ids and np.array_equal(large.seen_items, small.seen_items)
    assert large.seen_items.max() < 100
    assert large.model_path.read_bytes() == small.model_path.read_bytes()
    assert large.foldin is not None and large.foldin.shape == (64, 1000)


def test_scaling_parts_report_every_figure(small_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's structure for the SAE and catalog parts, the Ray functions replaced by their one-process
    equivalents (the real ones are tested in test_distributed*; the benchmark's full run exercises them here)."""
    import recsae_core.concepts.on_ray
    import recsae_core.sae.on_ray
    import recsae_core.sae.stats_on_ray
    from recsae_core.concepts.catalog import top_samples
    from recsae_core.probe.collect import load_activations
    from recsae_core.sae.stats import latent_statistics
    from recsae_core.sae.train import train_sae
    from service.bench_distributed import catalog_scaling, sae_scaling

    def h_of(probe: Path):
        return load_activations(probe)[0]

    monkeypatch.setattr(recsae_core.sae.on_ray, "train_sae_on_ray",
                        lambda probe, config, ray_config, **_: train_sae(h_of(probe), config))  # fmt: skip
    monkeypatch.setattr(recsae_core.sae.stats_on_ray, "latent_statistics_on_ray",
                        lambda sae, probe, ray_config: latent_statistics(sae, h_of(probe)))  # fmt: skip
    monkeypatch.setattr(recsae_core.concepts.on_ray, "top_units_on_ray",
                        lambda sae, probe, users, n, ray_config: top_samples(sae, h_of(probe).numpy(), users, n,
                                                                             probe, None, False))  # fmt: skip
    layout = RunLayout(small_run)
    sae = sae_scaling(layout.probe, SMALL_SAE, "127.0.0.1:1", log=lambda _: None)
    assert set(sae["ray"]) == {"1", "2"} and sae["budget_samples"] == 4000 and sae["ratio"] > 0
    for figures in (sae["one_process"], *sae["ray"].values()):
        assert figures["samples_seen"] >= 4000 and figures["samples_per_second"] > 0 and 0 < figures["fvu"] < 1
    assert sae["fvu_gap"] == 0  # the same training twice: one SAE
    catalog = catalog_scaling(layout.sae, layout.probe, "127.0.0.1:1", log=lambda _: None)
    for part in ("statistics", "top_samples"):
        assert catalog[part]["one_process_s"] >= 0 and set(catalog[part]["ray_s"]) == {"1", "2"}
    assert catalog["samples"] == 400 and (catalog["ratio"] is None or catalog["ratio"] > 0)


def test_goals_read_the_report() -> None:
    def entry(n: int, concurrency: int, p50: float, monitor: float) -> dict:
        return {"n_items": n, "concurrency": concurrency, "p50_ms": {"bare": p50, "monitor": p50 * monitor,
                "steer": p50}, "ratios": {"monitor_p50": monitor}}  # fmt: skip

    report = {"probe": {"ratio": 1.8}, "sae": {"skipped": "no Ray Train"},
              "serve": [entry(100_000, 1, 10.0, 1.02), entry(1_000_000, 1, 40.0, 1.0), entry(1_000_000, 16, 9, 1.1)]}
    assert goals(report) == {
        "probe_ratio_at_least_1.7": True, "sae_ratio_at_least_1.7": None,
        "monitor_over_bare_p50_at_most_1.05": False,
        "p50_1m_over_100k_at_concurrency_1": {"bare": 4.0, "monitor": 3.92, "steer": 4.0},
        "p50_1m_within_3x_of_100k": False,
    }  # fmt: skip
    assert goals({})["p50_1m_within_3x_of_100k"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--items", "10,1000"], "--items: every catalogue needs at least 20 items, got 10"),
        (["--items", "1000,1000"], "--items: sizes repeat (1000,1000)"),
        (["--items", "1k"], "--items expects comma-separated positive integers, got '1k'"),
        (["--concurrency", "0"], "--concurrency expects comma-separated positive integers, got '0'"),
        (["--concurrency", "5000"], "--concurrency: at most 1024 clients, got 5000"),
        (["--parts", "probe,nope"], "--parts: unknown part(s) nope; expected some of probe, sae, catalog, serve"),
        (["--latents", "8", "--k", "16"], "--k 16 exceeds --latents 8"),
        (["--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: no Ray cluster to join"),
    ],
)
def test_bad_options_are_refused_in_one_line(capsys, tmp_path: Path, extra: list[str], message: str) -> None:
    args = ["bench", "scale", "--out", str(tmp_path / "o.json"), "--work-dir", str(tmp_path / "w"), *extra]
    assert message in cli_refusal(capsys, args, entry=main)
    assert not (tmp_path / "w").exists()  # refused before any work


def test_an_out_folder_and_bad_numbers_are_refused(capsys, tmp_path: Path) -> None:
    assert "is a folder" in cli_refusal(capsys, ["bench", "scale", "--out", str(tmp_path)], entry=main)
    with pytest.raises(SystemExit) as info:
        main(["bench", "scale", "--out", str(tmp_path / "o.json"), "--users", "0"])
    assert info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_scale_end_to_end(tmp_path: Path) -> None:
    """2,000 users and 1,000 items: the probe on the command's own local cluster, and the service. (A second catalogue
    would add a service start, about 40 s here; test_catalogue_bundles_extend_the_run covers larger ones.)"""
    out = tmp_path / "scale.json"
    recsae = str(Path(sys.executable).with_name("recsae"))
    done = subprocess.run(
        [recsae, "bench", "scale", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--users", "2000",
         "--items", "1000", "--parts", "probe,serve", "--concurrency", "1", "--rounds", "1", "--duration", "0.3",
         "--warmup", "0.1", "--latents", "64", "--k", "4", "--sae-samples", "10000", "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    # The report is the last line: Ray's raylet may print a line of its own when the service shuts down.
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report
    assert report["model"]["n_users"] == 2000 and report["served_sae"]["n_samples"] == 2000
    probe = report["probe"]
    assert probe["ratio"] > 0 and probe["one_process"]["samples"] == 2000
    assert all(r["samples"] == 2000 and r["rows_per_s"] > 0 and r["identical_to_one_process"]
               for r in probe["ray"].values())  # fmt: skip
    assert [(e["n_items"], e["concurrency"]) for e in report["serve"]] == [(1000, 1)]
    for entry in report["serve"]:
        for key in ("p50_ms", "p99_ms", "rps"):
            assert set(entry[key]) == {"bare", "monitor", "steer"} and min(entry[key].values()) > 0
        assert entry["rss_mb"] > 50 and entry["errors"] == {"bare": 0, "monitor": 0, "steer": 0}
    assert set(report["goals"]) >= {"probe_ratio_at_least_1.7", "monitor_over_bare_p50_at_most_1.05"}
    assert report["goals"]["sae_ratio_at_least_1.7"] is None  # not measured
    # The cluster the command started is gone.
    assert report["ray"]["started_here"]
    host, port = report["ray"]["address"].split(":")
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass
