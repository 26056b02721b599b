"""Batching without a timer: a call runs at once when no batch is running, and the calls that arrive while one runs
are run together as the next batch (up to `max_batch_size`) as soon as it ends.

Ray's `@serve.batch` forms a batch by waiting up to `batch_wait_timeout_s` after its first request, whether or not
anything else is coming, and forms the next one while the previous still runs: a lone request always waits out the
timer (2 ms by default here), and with a zero timer every request under load becomes its own batch. Here the engine
being busy is what groups requests, so a lone request pays nothing and a loaded replica runs full batches.
A positive `wait_s` still lets a batch that is not full wait that long for more before it starts (the old behaviour,
for a model whose batch cost hardly grows with its size).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


class Batcher(Generic[Job, Result]):
    """`await batcher(job)` -> that job's result from `run(batch)`, which returns one result per job, in order."""

    def __init__(
        self, run: Callable[[list[Job]], Awaitable[list[Result]]], max_batch_size: int = 32, wait_s: float = 0.0
    ) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.waiting: deque[tuple[Job, asyncio.Future[Result]]] = deque()
        self.worker: asyncio.Task | None = None

    async def __call__(self, job: Job) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.waiting.append((job, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.waiting:
            if self.wait_s > 0 and len(self.waiting) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            batch = [self.waiting.popleft() for _ in range(min(self.max_batch_size, len(self.waiting)))]
            batch = [(job, future) for job, future in batch if not future.cancelled()]  # callers gone
            if not batch:
                continue
            try:
                results = await self.run([job for job, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} jobs returned {len(results)} results")
            except asyncio.CancelledError:  # the replica is shutting down: nobody waits forever
                for _, future in [*batch, *self.waiting]:
                    future.cancel()
                raise
            except Exception as err:  # every caller of the batch gets the error, as with @serve.batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
