"""Probe shards at a local path or any pyarrow filesystem URI (issue 19, `--activations`): RUN/probe keeps the
metadata and the completion record, which records the URI and every shard's sha256 and size.

With a `file://` URI: the shards are byte for byte those of a probe into RUN/probe, and so are the SAE trained on
them and its statistics; a shard changed, truncated or removed there is refused in one line naming it; a probe cut
short never reads as complete; a location pyarrow cannot use is refused in one line naming the option. On S3: the
same probe -> SAE path against moto, an S3 emulator served on loopback here, because a real S3 is out of reach from
the test machines."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _cli import cli_refusal
from _ray_cluster import copy_recommender

from recsae_core.common.errors import ArtifactError, ConfigError, IncompleteError
from recsae_core.common.layout import (
    PROBE_ACTIVATIONS,
    PROBE_META,
    PROBE_SHARD_FILES,
    SAE_WEIGHTS,
    STATS_FILE,
    RunLayout,
)
from recsae_core.common.storage import open_store
from recsae_core.pipeline.steps import sae_step
from recsae_core.probe.collect import batch_bounds, collect, load_activations, probe_batch, sample_index, write_probe
from recsae_core.recommenders.run import load_run
from recsae_core.sae.config import SAETrainConfig
from service.local import free_port

pytestmark = pytest.mark.slow

SMALL_SAE = SAETrainConfig(n_latents=64, k=4, epochs=3, progress=False)
"""An SAE that trains in seconds on the ~940 BPR-MF samples: the comparisons need equal SAEs, not good ones."""
ROWS_PER_SHARD = 300
"""Four shards of the ~940 BPR-MF samples, so shard boundaries are crossed."""
BUCKET = "recsae-test"


def probed(trained_run, root: Path, activations: str | None = None, rows_per_shard: int = ROWS_PER_SHARD) -> Path:
    """A copy of the shared BPR-MF run, probed into root/probe, its shards at `activations` when given."""
    run = copy_recommender(trained_run("bprmf"), root)
    store = None if activations is None else open_store(activations, RunLayout(run).probe)
    collect(load_run(run), rows_per_shard=rows_per_shard, progress=False, activations=store)
    return run


@pytest.fixture(scope="module")
def in_folder(trained_run, tmp_path_factory) -> Path:
    """The reference: a probe with its shards in RUN/probe, and its SAE."""
    run = probed(trained_run, tmp_path_factory.mktemp("in-folder"))
    sae_step(run, SMALL_SAE)
    return run


@pytest.fixture(scope="module")
def at_uri(trained_run, tmp_path_factory) -> tuple[Path, Path]:
    """(run, folder of its shards): a probe whose shards are at a file:// URI outside the run folder."""
    acts = tmp_path_factory.mktemp("shared-storage") / "acts"
    return probed(trained_run, tmp_path_factory.mktemp("at-uri"), acts.as_uri()), acts


def test_shards_at_a_uri_are_those_of_the_run_folder_byte_for_byte(in_folder, at_uri):
    run, acts = at_uri
    folder = RunLayout(in_folder).probe
    assert sorted(p.name for p in RunLayout(run).probe.iterdir()) == ["complete.json", PROBE_META]
    meta = json.loads((RunLayout(run).probe / PROBE_META).read_text())
    assert meta[PROBE_ACTIVATIONS] == acts.as_uri() and len(meta["shards"]) == 4
    assert sorted(p.name for p in acts.iterdir()) == meta["shards"]
    for name in meta["shards"]:
        data = (acts / name).read_bytes()
        assert data == (folder / name).read_bytes(), name
        assert meta[PROBE_SHARD_FILES][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    # The rest of the meta is the one-folder probe's (same recommender, so the same made_from).
    rest = {k: v for k, v in meta.items() if k not in (PROBE_ACTIVATIONS, PROBE_SHARD_FILES)}
    assert rest == json.loads((folder / PROBE_META).read_text())
    for read, expected in zip(load_activations(RunLayout(run).probe), load_activations(folder), strict=True):
        np.testing.assert_array_equal(np.asarray(read), np.asarray(expected))


def test_the_sae_and_its_statistics_from_a_uri_are_those_from_the_run_folder(in_folder, at_uri):
    run, _ = at_uri
    metrics = sae_step(run, SMALL_SAE)
    for name in (SAE_WEIGHTS, STATS_FILE):
        assert (RunLayout(run).sae / name).read_bytes() == (RunLayout(in_folder).sae / name).read_bytes(), name
    reference = json.loads((RunLayout(in_folder).sae / "metrics.json").read_text())
    assert (metrics["fvu"], metrics["ndcg@10"]) == (reference["fvu"], reference["ndcg@10"])
    RunLayout(run).verify_sae()  # and the probe at the URI it was made from


def test_a_probe_elsewhere_than_asked_is_redone_a_complete_one_kept_without_the_option(in_folder, at_uri, tmp_path):
    run, acts = at_uri
    RunLayout(run).verify_probe()  # without --activations: complete wherever its shards are
    RunLayout(run).verify_probe(acts.as_uri())
    other = (tmp_path / "elsewhere").as_uri()
    with pytest.raises(IncompleteError, match=f"its shards are at {acts.as_uri()}, not at {other}"):
        RunLayout(run).verify_probe(other)
    with pytest.raises(IncompleteError, match=f"not at {acts.as_uri()}"):
        RunLayout(in_folder).verify_probe(acts.as_uri())


def damage_shard(shard: Path, damage: str) -> None:
    data = shard.read_bytes()
    if damage == "changed":
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of the last tensor's last value
    elif damage == "truncated":
        shard.write_bytes(data[:-8])
    else:
        shard.unlink()


@pytest.mark.parametrize(("damage", "says"), [("changed", ": sha256 does not match "), ("truncated", " (truncated "),
                                              ("missing", ": listed in ")])  # fmt: skip
def test_a_shard_changed_or_gone_at_the_uri_is_refused_in_one_line_naming_it(trained_run, tmp_path, capsys, damage,
                                                                             says):  # fmt: skip
    acts = tmp_path / "acts"
    run = probed(trained_run, tmp_path / "run", acts.as_uri())
    damage_shard(acts / "shard-00002.safetensors", damage)
    assert not RunLayout(run).probe_complete()
    line = cli_refusal(capsys, ["sae-sweep", "--run", str(run), "--ks", "4", "--widths", "64",
                                "--out", str(tmp_path / "sweep.json"), "--quiet"])  # fmt: skip
    assert line.startswith(f"recsae: error: {acts.as_uri()}/shard-00002.safetensors") and says in line, line
    assert str(RunLayout(run).probe / PROBE_META) in line
    with pytest.raises(ArtifactError, match="shard-00002"):
        load_activations(RunLayout(run).probe)


def test_a_probe_cut_short_at_the_uri_never_reads_as_complete_and_a_new_one_clears_the_old(trained_run, tmp_path):
    """The probe is redone into the same URI with 500 rows per shard and killed after its first shard: the
    completion record in RUN/probe is the old probe's, whose first shard was overwritten, so it is refused. A
    complete probe then leaves only its own shards there, the old probe's last two gone."""
    acts = tmp_path / "acts"
    run = probed(trained_run, tmp_path / "run", acts.as_uri())
    ctx = load_run(run)
    users, positions = sample_index(ctx)

    def killed_after_the_first_shard() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for a, b in batch_bounds(len(users), 600):
            yield probe_batch(ctx, users[a:b], positions[a:b]), users[a:b], positions[a:b]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_probe(ctx, killed_after_the_first_shard(), 500, False, 2, open_store(acts.as_uri()))
    with pytest.raises(ArtifactError, match=r"shard-00000\.safetensors: \d+ bytes, .* records"):
        RunLayout(run).verify_probe()
    assert not [p for p in acts.iterdir() if p.name.endswith(".tmp")]

    collect(ctx, rows_per_shard=500, progress=False, activations=open_store(acts.as_uri()))
    assert sorted(p.name for p in acts.iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    RunLayout(run).verify_probe()


@pytest.mark.parametrize(("location", "says"), [
    ("foo://bucket/acts", "pyarrow cannot resolve it (Unrecognized filesystem type in URI: foo://bucket/acts)"),
    ("file://relative/acts", "pyarrow cannot resolve it ("),
    ("s3://bucket/acts?access_key=me&secret_key=hunter2", "carries credentials (access_key)"),
    ("s3://", "names no folder"),
    ("RUN/probe/acts", "inside the probe folder"),
    ("RUN/recommender/config.json", "cannot write there ("),  # a file, not a folder
])  # fmt: skip
def test_a_location_pyarrow_cannot_use_is_refused_in_one_line(trained_run, tmp_path, capsys, location, says):
    run = copy_recommender(trained_run("bprmf"), tmp_path / "run")
    location = location.replace("RUN", str(run))
    line = cli_refusal(capsys, ["train-sae", "--run", str(run), "--activations", location, "--quiet"])
    assert line.startswith(f"recsae: error: --activations {location.split('?')[0]}") and says in line, line
    assert "hunter2" not in line
    assert not RunLayout(run).probe.exists()


def test_bundle_takes_activations_only_with_import_onnx(trained_run, tmp_path, capsys):
    run = copy_recommender(trained_run("bprmf"), tmp_path / "run")
    line = cli_refusal(capsys, ["bundle", "--run", str(run), "--activations", str(tmp_path / "acts")])
    assert "--activations only applies with --import-onnx" in line


# ---------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on loopback with one bucket (moto is an S3 emulator: a real S3 is out of reach here); yields
    the URI query that points pyarrow at it. Credentials come from the environment, as in production."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
            env.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
            filesystem, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?{query}&allow_bucket_creation=true")
            filesystem.create_dir(BUCKET)
            yield query
        finally:
            server.stop()


def test_probe_to_s3_then_the_sae_from_it_as_from_the_run_folder(s3, trained_run, in_folder, tmp_path, capsys):
    uri = f"s3://{BUCKET}/runs/bprmf/acts?{s3}"
    run = probed(trained_run, tmp_path / "run", uri)
    store = open_store(uri)
    meta = RunLayout(run).verify_probe()
    assert meta[PROBE_ACTIVATIONS] == uri and store.names() == meta["shards"]
    for name in meta["shards"]:
        with store.open(name) as handle:
            assert handle.read() == (RunLayout(in_folder).probe / name).read_bytes(), name
    sae_step(run, SMALL_SAE)
    for name in (SAE_WEIGHTS, STATS_FILE):
        assert (RunLayout(run).sae / name).read_bytes() == (RunLayout(in_folder).sae / name).read_bytes(), name

    with store.filesystem.open_output_stream(store.path("shard-00001.safetensors"), compression=None) as out:
        out.write(b"not the shard the probe wrote")
    line = cli_refusal(capsys, ["sae-sweep", "--run", str(run), "--ks", "4", "--widths", "64",
                                "--out", str(tmp_path / "sweep.json"), "--quiet"])  # fmt: skip
    assert line.startswith(f"recsae: error: s3://{BUCKET}/runs/bprmf/acts/shard-00001.safetensors: "), line


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_line(s3, trained_run, tmp_path, capsys):
    run = copy_recommender(trained_run("bprmf"), tmp_path / "run")
    closed = f"endpoint_override=127.0.0.1:{free_port()}&scheme=http&region=us-east-1"
    for uri in (f"s3://no-such-bucket/acts?{s3}", f"s3://{BUCKET}/acts?{closed}"):
        line = cli_refusal(capsys, ["train-sae", "--run", str(run), "--activations", uri, "--quiet"])
        assert line.startswith(f"recsae: error: --activations {uri}: cannot write there ("), line
    with pytest.raises(ConfigError, match="no-such-bucket"):
        open_store(f"s3://no-such-bucket/acts?{s3}")
    assert not RunLayout(run).probe.exists()


def test_bundle_import_onnx_probes_to_a_uri_too(tmp_path, capsys):
    """`bundle --import-onnx` probes an outside model: with --activations its shards go there, and the import's work
    folder keeps the probe's record."""
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import save_file

    from recsae_core.pipeline.cli import main

    rng = np.random.default_rng(0)
    weights, features = rng.normal(size=(6, 16)).astype(np.float32), rng.normal(size=(80, 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["h"])], "tower",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 16])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )  # fmt: skip
    (tmp_path / "tower.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                          .SerializeToString())  # fmt: skip
    save_file({"item_embeddings": rng.normal(size=(12, 16)).astype(np.float32)}, str(tmp_path / "items.safetensors"))
    items = "".join(f"it{i},Item {i},Drama\n" for i in range(12))
    (tmp_path / "items.csv").write_text(f"item_id,title,genres\n{items}")
    save_file({"features": features}, str(tmp_path / "users.safetensors"))
    acts, out = tmp_path / "acts", tmp_path / "bundle"
    code = main(["bundle", "--import-onnx", str(tmp_path / "tower.onnx"), "--item-embeddings",
                 str(tmp_path / "items.safetensors"), "--items", str(tmp_path / "items.csv"), "--user-inputs",
                 str(tmp_path / "users.safetensors"), "--out", str(out), "--activations", acts.as_uri(), "--latents",
                 "32", "--k", "4", "--sae-epochs", "2", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    probe = tmp_path / "bundle.work" / "probe"
    meta = json.loads((probe / PROBE_META).read_text())
    assert meta[PROBE_ACTIVATIONS] == acts.as_uri() and sorted(p.name for p in acts.iterdir()) == meta["shards"]
    assert sorted(p.name for p in probe.iterdir()) == ["complete.json", PROBE_META]
    np.testing.assert_allclose(load_activations(probe)[0].numpy(), features @ weights, rtol=1e-5, atol=1e-5)


def test_a_reader_of_whole_shards_leaves_out_exactly_the_rows_named(tmp_path):
    """What Ray Train's workers read of an import's probe: every row but the held-out ones, across shard borders."""
    from recsae_core.probe.shards import LeaveOut, h_of_shard_bytes, open_probe, writing_probe

    h = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    with writing_probe(tmp_path / "probe", 16, {"source": "test", "sample": "input-row"}) as writer:
        writer.add(h, np.arange(50), np.zeros(50, dtype=np.int64))
    probe = open_probe(tmp_path / "probe")
    assert len(probe.headers) == 4  # 16 + 16 + 16 + 2 rows
    held_out = np.array([33, 0, 15, 16, 49])
    batch = {"bytes": [Path(path).read_bytes() for path in probe.paths()], "path": probe.paths()}
    kept = h_of_shard_bytes(batch, LeaveOut.of(probe, held_out))["h"]
    assert np.array_equal(kept, np.delete(h, held_out, axis=0))
    assert np.array_equal(h_of_shard_bytes(batch)["h"], h)


def test_shards_read_one_at_a_time_sample_and_evaluate_as_the_whole_probe(in_folder):
    """What `sae_step` on Ray holds of the probe: shards read one at a time (`ShardRows`), from which the fixed
    sample and the reconstruction metrics are exactly those of the probe read whole."""
    import torch

    from recsae_core.probe.shards import ShardRows, open_probe
    from recsae_core.sae.activations import count_rows, take_rows
    from recsae_core.sae.model import SAEConfig
    from recsae_core.sae.train import evaluate_reconstruction, random_sae

    probe = open_probe(RunLayout(in_folder).probe)
    whole, streamed = probe.read_all()[0], ShardRows(probe)
    assert len(probe.headers) >= 2 and count_rows(streamed) == len(whole)  # more than one shard is read
    index = torch.randperm(len(whole), generator=torch.Generator().manual_seed(0))[:300]
    assert torch.equal(take_rows(streamed, index), whole[index])
    sae = random_sae(SAEConfig(d_in=whole.shape[1], n_latents=64, k=4), whole, seed=0)
    assert torch.equal(random_sae(sae.cfg, streamed, seed=0).W_dec, sae.W_dec)
    assert evaluate_reconstruction(sae, streamed, 256) == evaluate_reconstruction(sae, whole, 256)
