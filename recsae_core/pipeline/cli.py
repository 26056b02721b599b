"""The `recsae` command line: every offline step, the pipeline, and (later) the service. Its options and parser are
in `pipeline.options`; this module holds the handler of each command and the dispatch to it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from recsae_core.common.cli_config import typed
from recsae_core.common.errors import ConfigError, RecsaeError
from recsae_core.pipeline.options import (
    CONTROL_OPTIONS,
    IMPORT_ONLY,
    PIPELINE_SAE_OPTIONS,
    RAY_OPTIONS,
    SAE_OPTIONS,
    SWEEP_SAE_OPTIONS,
    TRAIN_OPTIONS,
    TRAINING_ONLY,
    activations_store,
    build_parser,
    int_list,
    ray_config,
    sae_config,
)

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
"""Handler of each command, by name. Kept beside `main`, not the parser: only the dispatch reads it, and the service
registers its own commands' handlers into it with `command`."""


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return register


@command("data")
def cmd_data(args: argparse.Namespace) -> int:
    from recsae_core.data.datasets import load_dataset
    from recsae_core.data.splits import make_split

    data = load_dataset(args.dataset)
    general = make_split(data, args.protocol, sequential=False, seed=args.seed)
    popularity = general.item_popularity()
    info = {
        "dataset": data.name,
        "protocol": args.protocol,
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_interactions": data.n_interactions,
        "density": round(data.n_interactions / (data.n_users * data.n_items), 6),
        "filters": data.filters,
        "split_general": "leave-one-out by time" if general.sequential else "per-user random 8:1:1",
        "split_sequential": "leave-one-out by time",
        "train_valid_test": [general.n_train, int(general.valid.indptr[-1]), int(general.test.indptr[-1])],
        "has_item_metadata": any(g for g in data.item_meta.genres),
        "has_user_metadata": data.user_meta is not None,
        "max_item_train_popularity": int(popularity.max()),
    }
    print(json.dumps(info))
    return 0


@command("train-recommender")
def cmd_train(args: argparse.Namespace) -> int:
    from recsae_core.recommenders.run import train_step

    config = TRAIN_OPTIONS.build(args)
    metrics = train_step(args.out, args.dataset, args.model, args.protocol, config, ray_config=ray_config(args))
    summary = {k: metrics[k] for k in ("dataset", "model", "protocol", "epochs_trained", "train_seconds")}
    summary["test"] = {k: v for k, v in metrics["test"].items() if k.endswith("@10")}
    print(json.dumps(summary))
    return 0


@command("train-sae")
def cmd_train_sae(args: argparse.Namespace) -> int:
    from recsae_core.pipeline.steps import probe_step, sae_step

    config, ray = sae_config(args), ray_config(args)
    probe_step(args.run, config.progress, ray, activations_store(args, args.run))
    metrics = sae_step(args.run, config, ray)
    keys = ("fvu", "dead_fraction", "seconds", "ndcg@10", "passthrough_identical_top10_fraction")
    print(json.dumps({k: metrics[k] for k in keys}))
    return 0


@command("bundle")
def cmd_bundle(args: argparse.Namespace) -> int:
    if args.import_onnx is not None:
        from recsae_core.pipeline.importer import import_onnx

        if args.run is not None:
            raise ConfigError("--run and --import-onnx exclude each other: bundle a run, or import a model")
        missing = [f for f in ("item_embeddings", "items", "user_inputs", "out") if getattr(args, f) is None]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise ConfigError(f"--import-onnx also needs {flags}")
        result = import_onnx(
            args.import_onnx, args.item_embeddings, args.items, args.user_inputs, args.out, sae_config(args),
            name=args.name, work=args.work, activations=activations_store(args), ray_config=ray_config(args),
        )  # fmt: skip
        print(json.dumps(result))
        return 0
    given = [
        *("--" + f.replace("_", "-") for f in IMPORT_ONLY if f in typed(args)),
        *SAE_OPTIONS.typed(args),
        *RAY_OPTIONS.typed(args),
    ]  # $RAY_ADDRESS alone is not refused: a RayJob's pods set it for every command
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise ConfigError(
            f"{', '.join(given)} only {verb} with --import-onnx: bundle --run packs what the run already holds"
        )
    if args.run is None:
        raise ConfigError("bundle needs --run RUN_DIR (or --import-onnx MODEL.onnx ...)")
    from recsae_core.pipeline.steps import bundle_step

    print(json.dumps(bundle_step(args.run, args.out)))
    return 0


@command("interpret")
def cmd_interpret(args: argparse.Namespace) -> int:
    from recsae_core.common.layout import REPORT, RunLayout
    from recsae_core.concepts.catalog import CatalogOptions, build_catalog
    from recsae_core.concepts.llm_client import LLMOptions

    given = [f for f in ("llm_url", "llm_model", "llm_api_key", "llm_cache_only") if getattr(args, f)]
    given += [f for f in ("llm_concurrency", "llm_latents") if f in typed(args)]
    if args.labeler != "llm" and given:
        raise ConfigError(f"--{given[0].replace('_', '-')} only applies with --labeler llm")
    llm = LLMOptions(url=args.llm_url, model=args.llm_model, api_key=args.llm_api_key, concurrency=args.llm_concurrency,
                     cache_only=args.llm_cache_only)  # fmt: skip
    options = CatalogOptions(llm_latents=args.llm_latents, progress=not args.quiet)
    catalog = build_catalog(args.run, args.labeler, llm, options, ray_config(args))
    summary = catalog["summary"]
    keys = ("live_latents", "mean_confidence", "share_confidence_ge_0.8", "mean_auc", "coherence", "seconds")
    layout = RunLayout(args.run)
    out = {"catalog": str(layout.catalog), "report": str(layout.concepts / REPORT),
           "version": catalog["version"], "labeler": catalog["labeler"], **{k: summary[k] for k in keys}}  # fmt: skip
    if "llm" in summary:
        out["llm"] = summary["llm"]
    print(json.dumps(out))
    return 0


@command("import")
def cmd_import(args: argparse.Namespace) -> int:
    from recsae_core.recommenders.imported import import_step

    metrics = import_step(
        args.out, args.onnx, args.item_embeddings, args.recipe, args.interactions, items=args.items, users=args.users,
        name=args.name, protocol=args.protocol, seed=args.seed, ray_config=ray_config(args), progress=not args.quiet,
    )  # fmt: skip
    keys = ("dataset", "recipe", "protocol", "n_users", "n_items", "n_interactions", "import", "import_seconds")
    summary = {"run": str(args.out), **{k: metrics[k] for k in keys}}
    summary["test"] = {k: v for k, v in metrics["test"].items() if k.endswith("@10")}
    print(json.dumps(summary))
    return 0


@command("pipeline")
def cmd_pipeline(args: argparse.Namespace) -> int:
    from recsae_core.pipeline.steps import pipeline_on_run, run_pipeline

    new = {"--dataset": args.dataset, "--model": args.model, "--out": args.out}
    if args.run is not None:
        given = [flag for flag, value in new.items() if value is not None]
        given += ["--protocol"] * ("protocol" in typed(args)) + TRAINING_ONLY.typed(args)
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise ConfigError(f"{', '.join(given)} {verb} not apply with --run: its recommender is already trained "
                              "or imported")  # fmt: skip
    elif missing := [flag for flag, value in new.items() if value is None]:
        needs = "pipeline needs --run RUN_DIR, or --dataset, --model and --out"
        raise ConfigError(f"{needs}; missing {', '.join(missing)}")
    train = TRAIN_OPTIONS.build(args)
    sae = sae_config(args, PIPELINE_SAE_OPTIONS, device=train.device, progress=train.progress)
    ray, activations = ray_config(args), activations_store(args, args.run or args.out)
    if args.run is not None:
        summary = pipeline_on_run(args.run, sae, force=args.force, ray_config=ray, activations=activations)
    else:
        summary = run_pipeline(args.out, args.dataset, args.model, args.protocol, train, sae, force=args.force,
                               ray_config=ray, activations=activations)  # fmt: skip
    print(json.dumps({"run": str(args.run or args.out), "steps": list(summary)}))
    return 0


@command("sae-sweep")
def cmd_sae_sweep(args: argparse.Namespace) -> int:
    from recsae_core.sae.sweep import sweep_sae

    ks, widths = int_list(args.ks, "--ks"), int_list(args.widths, "--widths")
    if min(ks) > max(widths):
        raise ConfigError(f"every k in --ks {args.ks} exceeds every width in --widths {args.widths}")
    result = sweep_sae(args.run, ks, widths, sae_config(args, SWEEP_SAE_OPTIONS), args.out, ray_config(args))
    for point in result["points"]:
        print(json.dumps(point))
    return 0


@command("concept-control")
def cmd_concept_control(args: argparse.Namespace) -> int:
    from recsae_core.common.layout import REPORT, RunLayout
    from recsae_core.concepts.control_run import concept_control
    from recsae_core.debias.report import write_report

    result = concept_control(args.run, CONTROL_OPTIONS.build(args), ray_config(args))
    layout = RunLayout(args.run)
    write_report(layout.debias)
    print(json.dumps({"concepts": str(layout.concept_control), "report": str(layout.debias / REPORT),
                      "measured": len(result["concepts"]), "skipped": len(result["skipped"]),
                      "genre": result["summary"]["genre"], "seconds": result["seconds"]}))  # fmt: skip
    return 0


@command("debias")
def cmd_debias(args: argparse.Namespace) -> int:
    from recsae_core.common.layout import REPORT, RunLayout
    from recsae_core.debias.experiment import debias

    if not args.budget < 1:
        raise ConfigError(f"--budget is a relative NDCG@10 loss in (0, 1), got {args.budget}")
    if not args.fdr < 1:
        raise ConfigError(f"--fdr is a false discovery rate in (0, 1), got {args.fdr}")
    from recsae_core.debias.bootstrap import N_BOOT

    if args.sweep_points < 2:
        raise ConfigError(f"--sweep-points must be at least 2 (a front needs points), got {args.sweep_points}")
    result = debias(
        args.run, args.target, args.budget, fdr=args.fdr, max_candidates=args.candidates, progress=not args.quiet,
        log=lambda message: print(message, file=sys.stderr), sweep_points=args.sweep_points,
        bootstrap=N_BOOT if args.bootstrap is None else args.bootstrap, ray_config=ray_config(args),
    )  # fmt: skip
    keys = ("policy", "kind", "method", "version", "strength", "ndcg_rel_loss", "metrics")
    chosen = result.get("chosen") or {}
    operating = {name: {"strength": p["strength"], "ndcg_rel_loss": p["test"]["ndcg_rel_loss"]}
                 if p["strength"] is not None else None for name, p in result["operating_points"].items()}  # fmt: skip
    print(json.dumps({
        "target": result["target"], "original": result["original"], "chosen": {k: chosen.get(k) for k in keys},
        "operating_points": operating, "verdict": result["verdict"], "seconds": result["seconds"],
        "report": str(RunLayout(args.run).debias / REPORT),
    }))  # fmt: skip
    return 0


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RecsaeError as err:
        print(f"recsae: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recsae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
