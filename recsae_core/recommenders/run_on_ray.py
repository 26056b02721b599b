"""A run on Ray's workers: a `RunContext` holds an ONNX Runtime session, which does not pickle, so state shipped to
an actor pool (`recsae_core.common.ray_map.map_on_ray`) carries each run context as its folder, and every actor loads
the run from there once (its ONNX session single-threaded, as the actor's one CPU).

The context an actor loads is the driver's: the same contract files (the callers verify them before they start),
and the dataset and split rebuilt from the same files with the same seed. The folder is resolved on the driver (an
actor does not start in the driver's folder) and must be on storage every node mounts.
"""

from __future__ import annotations

from pathlib import Path

from recsae_core.common.ray_map import ByReference
from recsae_core.recommenders.run import RunContext, load_run


def run_folder(ctx: RunContext) -> str:
    """What a run context travels as: its folder, absolute."""
    return str(Path(ctx.root).resolve())


def reload_run(folder: str) -> RunContext:
    """The run context again, on an actor: loaded from its folder, in eval mode as every offline step uses it."""
    ctx = load_run(Path(folder), threads=1)
    ctx.model.eval()
    return ctx


RUN_BY_FOLDER: ByReference = {RunContext: (run_folder, reload_run)}
"""`map_on_ray(..., by_reference=RUN_BY_FOLDER)`: shared state that holds run contexts."""
