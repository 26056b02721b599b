"""Mapping a function over independent items, in this process or on a Ray cluster. The work is written once, as
`fn(shared, item)`, and `item_map` says where it runs: `map_here` (a loop with a progress bar) without a cluster,
else `map_on_ray`: a pool of actors (one CPU each, one per worker) that each receive `shared` once, through the object
store, and are then dealt items one at a time (`ray.util.ActorPool`). Results come back in the items' order whatever
order the actors finish in; the progress bar is the driver's and advances as each result arrives.

Why the results are the one-process ones: every item is computed by the same function on a copy of the same shared
state, and nothing flows from one item to the next (callers map only computations that are independent per item and
say why theirs are). Each actor reserves one CPU, so Ray runs it single-threaded (OMP_NUM_THREADS=1) where one
process uses all its cores: the callers' tests check that this leaves their numbers unchanged.

Some state does not pickle (a run's ONNX Runtime session): `by_reference` ships such types as a reference that every
actor resolves once, when it receives the shared state (`recsae_core.recommenders.run_on_ray`: a run by its folder).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

from recsae_core.common.ray_cluster import RayConfig, cluster_workers

T = TypeVar("T")
ByReference = Mapping[type, tuple[Callable[[Any], Any], Callable[[Any], Any]]]
"""Type -> (object -> its reference, reference -> the object again) for state that travels by reference."""
CHUNKS_PER_WORKER = 4
"""`map_chunks` cuts the items into about this many chunks per worker, so a slow chunk does not hold up the rest."""


class ItemMap(Protocol):
    """[fn(shared, item) for item in items], wherever it runs."""

    def __call__(
        self, fn: Callable[[Any, Any], T], shared: Any, items: Sequence[Any], *, desc: str = "", progress: bool = False
    ) -> list[T]: ...


def map_here(
    fn: Callable[[Any, Any], T], shared: Any, items: Sequence[Any], *, desc: str = "", progress: bool = False
) -> list[T]:
    """[fn(shared, item) for item in items] in this process, with a progress bar."""
    return [fn(shared, item) for item in tqdm(items, desc=desc, disable=not progress)]


def item_map(ray_config: RayConfig | None, by_reference: ByReference | None = None) -> ItemMap:
    """Where a map of independent items runs: `map_here` without a cluster, else `map_on_ray` on the cluster of
    `ray_config`, joined now (a bad address or worker count is refused before the caller's heavy work)."""
    if ray_config is None or not ray_config.on_ray:
        return map_here
    cluster_workers(ray_config)

    def on_ray(
        fn: Callable[[Any, Any], T], shared: Any, items: Sequence[Any], *, desc: str = "", progress: bool = False
    ) -> list[T]:
        return map_on_ray(fn, shared, items, ray_config, by_reference=by_reference, desc=desc, progress=progress)

    return on_ray


class SharedState:
    """One actor of the pool: the shared state (resolved once, in its constructor) and the function applied to it."""

    def __init__(self, fn: Callable[..., Any], shared: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.shared, self.args = fn, shared, args

    def apply(self, index: int, item: Any) -> tuple[int, Any]:
        return index, self.fn(self.shared, item, *self.args)


def map_on_ray(
    fn: Callable[..., T], shared: Any, items: Sequence[Any], ray_config: RayConfig, *args: Any,
    by_reference: ByReference | None = None, desc: str = "", progress: bool = False,
) -> list[T]:  # fmt: skip
    """[fn(shared, item, *args) for item in items], computed on the Ray cluster of `ray_config` by an actor pool
    (module docstring); `fn`, `shared` and `args` must pickle (a module-level function travels by its name)."""
    import ray
    from ray.util import ActorPool, deregister_serializer, register_serializer

    workers = cluster_workers(ray_config)
    if not items:
        return []
    for cls, (to_reference, from_reference) in (by_reference or {}).items():
        register_serializer(cls, serializer=to_reference, deserializer=from_reference)
    try:
        state = ray.put(shared)
        actor = ray.remote(num_cpus=1)(SharedState)
        actors = [actor.remote(fn, state, args) for _ in range(min(workers, len(items)))]
    finally:  # only what this map ships travels by reference
        for cls in by_reference or {}:
            deregister_serializer(cls)
    results: list[Any] = [None] * len(items)
    try:
        pool = ActorPool(actors)
        with tqdm(total=len(items), desc=desc, disable=not progress) as bar:
            for index, result in pool.map_unordered(lambda a, job: a.apply.remote(*job), list(enumerate(items))):
                results[index] = result
                bar.update()
    finally:  # free the CPUs for the next step at once, rather than when the handles are collected
        for handle in actors:
            ray.kill(handle)
    return results


def map_chunks(
    fn: Callable[..., T], shared: Any, items: Sequence[Any], ray_config: RayConfig, *args: Any
) -> list[T]:  # fmt: skip
    """[fn(shared, chunk, *args) for each contiguous chunk of `items`] with `map_on_ray`, a few chunks per worker
    (`CHUNKS_PER_WORKER`); results in chunk order."""
    size = max(1, -(-len(items) // (CHUNKS_PER_WORKER * cluster_workers(ray_config))))
    chunks = [items[start : start + size] for start in range(0, len(items), size)]
    return map_on_ray(fn, shared, chunks, ray_config, *args)
