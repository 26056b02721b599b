"""The replica's batcher: a lone request runs at once, the requests that arrive while a batch runs form the next one."""

from __future__ import annotations

import asyncio

import pytest

from service.batching import Batcher


class Recorder:
    """A batch function that records its batches and holds each until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, jobs: list[int]) -> list[int]:
        self.batches.append(list(jobs))
        await self.release.wait()
        if -1 in jobs:
            raise ValueError("bad job")
        return [job * 10 for job in jobs]


def test_a_lone_call_runs_at_once_and_later_arrivals_form_the_next_batch() -> None:
    async def scenario() -> tuple[list[int], list[list[int]]]:
        run = Recorder()
        batcher = Batcher(run, max_batch_size=3)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert run.batches == [[1]]  # no timer: it started before anything else arrived
        rest = [asyncio.create_task(batcher(j)) for j in (2, 3, 4, 5)]
        await asyncio.sleep(0)
        assert run.batches == [[1]]  # the others wait for the running batch
        run.release.set()
        results = await asyncio.gather(first, *rest)
        return results, run.batches

    results, batches = asyncio.run(scenario())
    assert results == [10, 20, 30, 40, 50]
    assert batches == [[1], [2, 3, 4], [5]]  # max_batch_size 3


def test_an_error_reaches_every_caller_of_its_batch_only() -> None:
    async def scenario() -> tuple[list[object], list[list[int]]]:
        run = Recorder()
        run.release.set()
        batcher = Batcher(run, max_batch_size=2)
        out = await asyncio.gather(*(batcher(j) for j in (0, 1, -1, 3, 4)), return_exceptions=True)
        return out, run.batches

    out, batches = asyncio.run(scenario())
    assert batches == [[0, 1], [-1, 3], [4]]  # all queued before the first batch started
    assert out[:2] == [0, 10] and out[4] == 40
    assert isinstance(out[2], ValueError) and isinstance(out[3], ValueError)


def test_a_caller_that_gave_up_is_left_out_of_the_batch() -> None:
    async def scenario() -> list[list[int]]:
        run = Recorder()
        batcher = Batcher(run, max_batch_size=8)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0)
        gone = asyncio.create_task(batcher(2))
        kept = asyncio.create_task(batcher(3))
        await asyncio.sleep(0)
        gone.cancel()
        run.release.set()
        assert await first == 10 and await kept == 30
        with pytest.raises(asyncio.CancelledError):
            await gone
        return run.batches

    assert asyncio.run(scenario()) == [[1], [3]]


def test_a_batch_that_loses_results_fails_its_callers() -> None:
    async def short(jobs: list[int]) -> list[int]:
        return jobs[:1]

    async def scenario() -> list[object]:
        batcher = Batcher(short, max_batch_size=4)
        return await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)

    out = asyncio.run(scenario())
    # Both calls were queued before the batch started, so both are in it, and both are told.
    assert all(isinstance(o, RuntimeError) and "a batch of 2 jobs returned 1 results" in str(o) for o in out), out
