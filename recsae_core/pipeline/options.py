"""The `recsae` command line's options: the tables derived from the config dataclasses, the parser of every offline
command, and the configs built from the parsed arguments. The handlers that act on them, and the dispatch to them, are
in `pipeline.cli`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsae_core.common.cli_config import ConfigOptions, Typed
from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import non_negative_int, positive_float, positive_int
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.common.storage import ProbeStorage, ShardStore
from recsae_core.concepts.control_config import ConceptControlConfig
from recsae_core.debias.sweeps import SWEEP_POINTS
from recsae_core.recommenders.config import TrainConfig
from recsae_core.sae.config import SAETrainConfig

TRAIN_OPTIONS = ConfigOptions(TrainConfig, {
    "epochs": "--epochs", "patience": "--patience", "batch_size": "--batch-size", "lr": "--lr", "device": "--device",
    "seed": "--seed", "progress": "--quiet",
})  # fmt: skip
"""The recommender's training options (train-recommender, pipeline)."""
SAE_OPTIONS = ConfigOptions(SAETrainConfig, {
    "n_latents": "--latents", "k": "--k", "lr": "--sae-lr", "epochs": "--sae-epochs",
    "max_samples": "--sae-max-samples", "max_minutes": "--sae-max-minutes", "dead_after": "--dead-after",
    "device": "--device", "progress": "--quiet",
})  # fmt: skip
"""The SAE options (train-sae, bundle --import-onnx); the pipeline shares --device and --quiet with training, and
sae-sweep takes k and the width from --ks and --widths."""
CONTROL_OPTIONS = ConfigOptions(ConceptControlConfig, {
    "min_users": "--min-users", "goal": "--goal", "budget": "--budget", "max_collateral": "--max-collateral",
    "progress": "--quiet",
})  # fmt: skip
"""concept-control's options."""
RAY_OPTIONS = ConfigOptions(RayConfig, {"address": "--ray-address", "workers": "--ray-workers"})
"""Where the distributed steps run (import, train-recommender, train-sae, bundle --import-onnx, sae-sweep, interpret,
pipeline, debias and concept-control: the wrapped model's evaluation on an actor pool, the recommender on Ray Train,
the probe on Ray Data, the SAE on Ray Train, its statistics and the catalog's top samples on Ray Data, the catalog's
labels, debias's causal screen and sweep points and concept-control's concepts on actor pools)."""
PIPELINE_SAE_OPTIONS = SAE_OPTIONS.without("device", "progress")
SWEEP_SAE_OPTIONS = SAE_OPTIONS.without("n_latents", "k")
PROBE_OPTIONS = ConfigOptions(ProbeStorage, {"activations": "--activations"})
"""Where the probe's shards go (the commands that probe: train-sae, pipeline, bundle --import-onnx); later steps read
the location from RUN/probe/meta.json."""
IMPORT_ONLY = ("item_embeddings", "items", "user_inputs", "name", "work", "activations")
"""bundle options that only apply with --import-onnx."""
TRAINING_ONLY = TRAIN_OPTIONS.without("device", "progress")
"""The pipeline's training options that do not apply to an existing run (--device and --quiet also drive its SAE)."""


PROTOCOL_HELP = (
    "recbole: leave-one-out by time for sequential models, per-user random 8:1:1 otherwise; loo: always "
    "leave-one-out (default: recbole)"
)


def add_train_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--dataset", required=required, help="ml-100k, ml-1m, or a folder of RecBole atomic files")
    p.add_argument("--model", required=required, choices=["bprmf", "lightgcn", "sasrec"])
    p.add_argument("--protocol", default="recbole", choices=["recbole", "loo"], action=Typed, help=PROTOCOL_HELP)
    TRAIN_OPTIONS.add_to(p)


def add_import_options(p: argparse.ArgumentParser) -> None:
    """`recsae import`'s options: the contract, the data as users have it, and the run it is written into."""
    p.add_argument("--onnx", required=True, type=Path, metavar="MODEL.onnx", help="the model: its inputs -> h")
    p.add_argument("--item-embeddings", required=True, type=Path, metavar="E.safetensors",
                   help="tensor item_embeddings (n, d) and optional item_bias (n,): scores = h E^T + b")  # fmt: skip
    p.add_argument("--recipe", required=True, type=Path, metavar="RECIPE.json",
                   help="how a user's model inputs are built: kind sequence, user_index or custom, input names, id "
                   "maps (paths relative to the recipe)")  # fmt: skip
    p.add_argument("--interactions", required=True, type=Path, metavar="INTER",
                   help="interaction log: RecBole .inter, or CSV: user_id,item_id[,timestamp][,rating]")  # fmt: skip
    p.add_argument(
        "--items",
        type=Path,
        metavar="ITEMS",
        help="item table (RecBole .item or CSV, any columns): what the concept catalog names latents by",
    )
    p.add_argument(
        "--users",
        type=Path,
        metavar="USERS",
        help="user table (RecBole .user or CSV): attributes for fairness targets such as gender",
    )
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="new run folder (RUN_DIR/recommender)")
    p.add_argument("--name", help="dataset name recorded in the run (default: the interactions file's name)")
    p.add_argument("--protocol", default="recbole", choices=["recbole", "loo"], help=PROTOCOL_HELP)
    p.add_argument("--seed", type=non_negative_int, default=TrainConfig.seed,
                   help=f"seed of the split every later step evaluates on (default: {TrainConfig.seed})")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    RAY_OPTIONS.add_to(p)


def build_parser(extend: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The offline commands; `extend(subparsers)` lets the service package add its own without a reverse import."""
    parser = argparse.ArgumentParser(prog="recsae", description="RecSAE: interpret and steer recommenders with SAEs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    info = data_sub.add_parser("info", help="print dataset statistics after filtering as JSON")
    info.add_argument("--dataset", required=True, help="ml-100k, ml-1m, or a folder of RecBole atomic files")
    info.add_argument("--protocol", default="recbole", choices=["recbole", "loo"])
    ConfigOptions(TrainConfig, {"seed": "--seed"}).add_to(info)  # the split a training run with this seed uses

    train = sub.add_parser("train-recommender", help="train BPR-MF, LightGCN or SASRec and evaluate it")
    add_train_options(train)
    train.add_argument("--out", required=True, type=Path, help="run folder (RUN_DIR/recommender is written)")
    RAY_OPTIONS.add_to(train)

    sae = sub.add_parser("train-sae", help="probe the run's recommender and train a TopK SAE on its activations")
    sae.add_argument("--run", required=True, type=Path, help="run folder with a trained recommender")
    SAE_OPTIONS.add_to(sae)
    RAY_OPTIONS.add_to(sae)
    PROBE_OPTIONS.add_to(sae)

    bundle = sub.add_parser("bundle", help="write the verified bundle the service loads")
    bundle.add_argument("--run", type=Path, help="run folder (recommender + SAE) to bundle")
    bundle.add_argument("--out", type=Path, help="bundle folder (default RUN_DIR/bundle)")
    bundle.add_argument(
        "--import-onnx", type=Path, metavar="MODEL.onnx",
        help="wrap a recommender we did not train into a bare SAE bundle, without interactions or metadata ('recsae "
        "import' then 'recsae pipeline --run' gives it the whole pipeline: ids, seen items, catalog, policies)",
    )  # fmt: skip
    # The options below apply to --import-onnx only; Typed records them so that --run can refuse them.
    bundle.add_argument(
        "--item-embeddings", type=Path, action=Typed, help="safetensors with item_embeddings (n_items, d)"
    )
    bundle.add_argument("--items", type=Path, action=Typed, help="CSV with item_id[,title,genres,popularity]")
    bundle.add_argument(
        "--user-inputs", type=Path, action=Typed, help="safetensors: the model's inputs, one row per user"
    )
    bundle.add_argument("--name", default="imported", action=Typed, help="dataset name recorded in the manifest")
    bundle.add_argument(
        "--work", type=Path, action=Typed, help="folder for the import's probe and SAE (default OUT.work)"
    )
    SAE_OPTIONS.add_to(bundle)
    PROBE_OPTIONS.add_to(bundle)
    RAY_OPTIONS.add_to(bundle)  # --import-onnx's probe, SAE and statistics; bundle --run only packs files

    interpret = sub.add_parser("interpret", help="name, describe and score every live SAE latent (concept catalog)")
    interpret.add_argument("--run", required=True, type=Path, help="run folder with probe/ and sae/")
    interpret.add_argument(
        "--labeler",
        default="tfidf",
        choices=["tfidf", "llm"],
        help="tfidf: metadata statistics (default, no model); llm: an OpenAI-compatible endpoint",
    )
    interpret.add_argument(
        "--llm-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1 (default $RECSAE_LLM_URL)"
    )
    interpret.add_argument("--llm-model", help="model name (default $RECSAE_LLM_MODEL, else the server's first model)")
    interpret.add_argument("--llm-api-key", help="bearer token (default $RECSAE_LLM_API_KEY)")
    interpret.add_argument(
        "--llm-concurrency", type=positive_int, default=4, action=Typed,
        help="requests in flight (1 suits a local llama.cpp server)",
    )  # fmt: skip
    interpret.add_argument(
        "--llm-latents",
        type=non_negative_int,
        action=Typed,
        default=0,
        help="label only this many latents with the language model (0 = all live latents)",
    )
    interpret.add_argument(
        "--llm-cache-only",
        action="store_true",
        help="label from RUN/concepts/llm_cache alone, without the endpoint: latents missing an answer keep their "
        "metadata label (to look at a long run before it ends)",
    )
    interpret.add_argument("--quiet", action="store_true", help="no progress bars")
    RAY_OPTIONS.add_to(interpret)

    imp = sub.add_parser("import", help="wrap a recommender trained elsewhere (ONNX model, item matrix, input "
                         "recipe) with its interaction log and tables into a run folder")  # fmt: skip
    add_import_options(imp)

    pipe = sub.add_parser(
        "pipeline",
        help="run every offline step in order, skipping finished ones: train --model on --dataset into --out, or "
        "continue an existing run (trained or imported) with --run",
    )
    pipe.add_argument("--run", type=Path, help="an existing run folder with a recommender (trained, or from 'recsae "
                      "import'): run probe -> sae -> concepts -> bundle on it")  # fmt: skip
    add_train_options(pipe, required=False)
    pipe.add_argument("--out", type=Path, help="run folder to train into (with --dataset and --model)")
    pipe.add_argument("--force", action="store_true", help="redo every step")
    PIPELINE_SAE_OPTIONS.add_to(pipe)
    RAY_OPTIONS.add_to(pipe)
    PROBE_OPTIONS.add_to(pipe)
    sweep = sub.add_parser("sae-sweep", help="benchmark the SAE k / width trade-off on a probed run")
    sweep.add_argument("--run", required=True, type=Path)
    sweep.add_argument("--ks", default="4,8,16,32", help="comma-separated k values")
    sweep.add_argument("--widths", default="1024", help="comma-separated latent counts")
    sweep.add_argument("--out", required=True, type=Path, help="JSON file; an .html page is written beside it")
    SWEEP_SAE_OPTIONS.add_to(sweep)
    RAY_OPTIONS.add_to(sweep)

    deb = sub.add_parser("debias", help="find bias latents, sweep a steering policy against baselines, save it")
    deb.add_argument("--run", required=True, type=Path, help="run folder with recommender + SAE")
    deb.add_argument("--target", required=True, help="popularity, gender or attribute:COLUMN=VALUE (VALUE vs the rest)")
    deb.add_argument("--budget", type=positive_float, default=0.02, help="max relative NDCG@10 loss (validation)")
    deb.add_argument("--fdr", type=positive_float, default=0.05, help="Benjamini-Hochberg false discovery rate")
    deb.add_argument("--candidates", type=positive_int, default=24, help="discoveries the causal screen tests")
    deb.add_argument("--sweep-points", type=positive_int, default=SWEEP_POINTS,
                     help=f"strengths swept per method, the same for every method ({SWEEP_POINTS})")  # fmt: skip
    deb.add_argument("--bootstrap", type=non_negative_int, default=None,
                     help="resamples of the paired bootstrap over users behind every 95%% interval (default: "
                          "recsae_core.debias.bootstrap.N_BOOT, 1000; 0 = no intervals)")  # fmt: skip
    deb.add_argument("--quiet", action="store_true", help="no progress bars")
    RAY_OPTIONS.add_to(deb)
    control = sub.add_parser("concept-control", help="ablate each concept that names an item attribute (genre, "
                             "...) and measure the attribute's drop, collateral and NDCG loss against an oracle "
                             "re-ranker: RUN/debias/concepts.json and the debias report")  # fmt: skip
    control.add_argument("--run", required=True, type=Path, help="run folder with recommender, SAE and catalog")
    CONTROL_OPTIONS.add_to(control)
    RAY_OPTIONS.add_to(control)
    if extend is not None:
        extend(sub)
    return parser


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated positive integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"{flag} expects comma-separated positive integers, got {text!r}")
    return values


def ray_config(args: argparse.Namespace) -> RayConfig:
    """Where the distributed steps run; --ray-workers without a cluster is refused (it would do nothing)."""
    config = RAY_OPTIONS.build(args)
    if not config.on_ray and "--ray-workers" in RAY_OPTIONS.typed(args):
        raise ConfigError("--ray-workers only applies with --ray-address (or $RAY_ADDRESS)")
    return config


def activations_store(args: argparse.Namespace, run: Path | None = None) -> ShardStore | None:
    """Where the probe of `run` writes its shards (None: RUN/probe), resolved and checked writable before any work
    starts."""
    from recsae_core.common.layout import RunLayout
    from recsae_core.common.storage import open_store

    location = PROBE_OPTIONS.build(args).activations
    return None if location is None else open_store(location, None if run is None else RunLayout(run).probe)


def sae_config(args: argparse.Namespace, options: ConfigOptions = SAE_OPTIONS, **fixed: Any) -> SAETrainConfig:
    """The SAE run's config from the parsed options, its device checked before any work starts."""
    from recsae_core.recommenders.run import resolve_device

    config = options.build(args, **fixed)
    config.device = resolve_device(config.device)
    return config
