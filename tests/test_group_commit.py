"""Group commit: who shares a batch, and who gets which outcome (no database)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from service.group_commit import BatchNotFinished, GroupCommit


class Recorder:
    """A ``run_batch`` that records its batches and, while ``hold`` is clear, waits for it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.started = asyncio.Event()

    async def run(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.started.set()
        await self.hold.wait()
        return [ValueError(f"odd {item}") if item % 2 else item * 10 for item in items]


async def with_a_batch_in_flight(
    max_batch: int = 8,
) -> tuple[Recorder, GroupCommit[int, int], asyncio.Task[int]]:
    """A ``GroupCommit`` whose first batch (item 0) is running and held there."""
    recorder = Recorder()
    batches = GroupCommit(recorder.run, max_batch=max_batch)
    recorder.hold.clear()
    first = asyncio.create_task(batches.submit(0))
    await recorder.started.wait()
    return recorder, batches, first


def test_a_lone_item_runs_at_once_as_a_batch_of_one() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batches = GroupCommit(recorder.run, max_batch=8)
        assert await asyncio.wait_for(batches.submit(4), 1) == 40
        assert recorder.batches == [[4]]

    asyncio.run(scenario())


def test_items_arriving_during_a_batch_run_together_next_in_arrival_order() -> None:
    async def scenario() -> None:
        recorder, batches, first = await with_a_batch_in_flight()
        later = [asyncio.create_task(batches.submit(item)) for item in (2, 4, 6)]
        await asyncio.sleep(0.01)
        assert recorder.batches == [[0]]  # the others wait for the batch in flight
        recorder.hold.set()
        assert await first == 0
        assert [await task for task in later] == [20, 40, 60]
        assert recorder.batches == [[0], [2, 4, 6]]

    asyncio.run(scenario())


def test_each_item_gets_its_own_outcome_and_an_error_stays_with_its_item() -> None:
    async def scenario() -> None:
        recorder, batches, blocker = await with_a_batch_in_flight()
        tasks = [asyncio.create_task(batches.submit(item)) for item in (1, 2, 3)]
        await asyncio.sleep(0)
        recorder.hold.set()
        await blocker
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [str(r) if isinstance(r, Exception) else r for r in results] == [
            "odd 1",
            20,
            "odd 3",
        ]
        assert recorder.batches == [[0], [1, 2, 3]]

    asyncio.run(scenario())


def test_a_failed_batch_fails_all_its_items_and_the_next_batch_still_runs() -> None:
    async def scenario() -> None:
        calls: list[list[int]] = []
        started, release = asyncio.Event(), asyncio.Event()

        async def run(items: Sequence[int]) -> Sequence[int | Exception]:
            calls.append(list(items))
            if len(calls) == 1:
                started.set()
                await release.wait()
            if len(calls) == 2:
                raise ConnectionError("the shared transaction failed")
            return list(items)

        batches = GroupCommit(run, max_batch=8)
        first = asyncio.create_task(batches.submit(1))
        await started.wait()
        doomed = [asyncio.create_task(batches.submit(item)) for item in (2, 3)]
        await asyncio.sleep(0)
        release.set()
        assert await first == 1
        for task in doomed:
            with pytest.raises(ConnectionError, match="shared transaction"):
                await task
        assert await batches.submit(4) == 4
        assert calls == [[1], [2, 3], [4]]

    asyncio.run(scenario())


def test_a_batch_holds_at_most_max_batch_items() -> None:
    async def scenario() -> None:
        recorder, batches, blocker = await with_a_batch_in_flight(max_batch=3)
        tasks = [asyncio.create_task(batches.submit(item)) for item in range(2, 16, 2)]
        await asyncio.sleep(0)
        recorder.hold.set()
        await asyncio.gather(blocker, *tasks)
        assert recorder.batches == [[0], [2, 4, 6], [8, 10, 12], [14]]

    asyncio.run(scenario())


def test_a_waiter_that_gives_up_does_not_stop_its_batch() -> None:
    async def scenario() -> None:
        recorder, batches, blocker = await with_a_batch_in_flight()
        impatient = asyncio.create_task(batches.submit(2))
        patient = asyncio.create_task(batches.submit(4))
        await asyncio.sleep(0)
        impatient.cancel()
        recorder.hold.set()
        assert await patient == 40
        assert await blocker == 0
        assert impatient.cancelled()
        assert recorder.batches == [[0], [2, 4]]  # its item still ran (its outcome dropped)

    asyncio.run(scenario())


def test_a_run_batch_that_answers_for_the_wrong_number_of_items_fails_them_all() -> None:
    async def scenario() -> None:
        async def short(items: Sequence[int]) -> Sequence[int | Exception]:
            return list(items)[:-1]

        batches = GroupCommit(short, max_batch=8)
        with pytest.raises(RuntimeError, match="0 outcomes for 1 items"):
            await batches.submit(7)

    asyncio.run(scenario())


def test_waiters_of_a_batch_that_cannot_finish_are_told_so() -> None:
    async def scenario() -> None:
        _, batches, first = await with_a_batch_in_flight()
        queued = asyncio.create_task(batches.submit(2))
        await asyncio.sleep(0)
        draining = next(iter(batches._queues.values())).draining
        assert draining is not None
        draining.cancel()  # as at shutdown
        for task in (first, queued):
            with pytest.raises(BatchNotFinished):
                await task

    asyncio.run(scenario())


def test_a_batch_that_cannot_finish_leaves_no_waiter_hanging() -> None:
    """Once the drain has stopped, every waiter already has its outcome: a defect here fails
    this test rather than leaving it (and a request) waiting forever."""

    async def scenario() -> None:
        _, batches, first = await with_a_batch_in_flight()
        queued = asyncio.create_task(batches.submit(2))
        await asyncio.sleep(0)
        draining = next(iter(batches._queues.values())).draining
        assert draining is not None
        draining.cancel()
        await asyncio.gather(draining, return_exceptions=True)
        for _ in range(3):  # let the waiters' tasks take the outcomes already set
            await asyncio.sleep(0)
        for task in (first, queued):
            assert task.done()
            assert isinstance(task.exception(), BatchNotFinished)

    asyncio.run(scenario())


def test_a_batch_needs_room_for_one_item() -> None:
    async def run(items: Sequence[int]) -> Sequence[int | Exception]:
        return list(items)

    with pytest.raises(ValueError, match="at least one"):
        GroupCommit(run, max_batch=0)


def test_a_drain_cancelled_before_it_starts_leaves_no_waiter_or_later_item_hanging() -> None:
    """A task cancelled before its first step never runs its coroutine, ``finally`` included
    (as at a shutdown that cancels every task at once): its waiter must still be told, and the
    next item must start a batch of its own rather than queue behind a drain that is gone."""

    async def scenario() -> None:
        recorder = Recorder()
        batches = GroupCommit(recorder.run, max_batch=8)
        first = asyncio.create_task(batches.submit(0))
        await asyncio.sleep(0)  # submitted: its drain is created but has not run yet
        draining = next(iter(batches._queues.values())).draining
        assert draining is not None
        draining.cancel()
        await asyncio.gather(draining, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)
        assert first.done()
        assert isinstance(first.exception(), BatchNotFinished)
        assert await asyncio.wait_for(batches.submit(2), timeout=5) == 20
        assert recorder.batches == [[2]]

    asyncio.run(scenario())
