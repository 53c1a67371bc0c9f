"""Group commit: the requests that arrive while one batch is in flight run together as the next.

Guarantees:
- one batch at a time per ``GroupCommit`` and event loop (a worker process has one loop): its
  items, in the order they arrived, go to one call of ``run_batch``, so they can share one
  transaction, one lock and one commit;
- nothing waits for a batch to fill: an item that finds no batch in flight starts one at once;
- every submitter gets its own item's outcome: ``run_batch`` returns one result or exception
  per item, in order; an exception raised by ``run_batch`` itself (the shared transaction
  failed) goes to every item of that batch;
- a submitter that stops waiting (its client hung up) does not stop its batch; its outcome is
  dropped. A batch that cannot finish (the loop is shutting down) fails its waiting items.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchNotFinished(RuntimeError):
    """The batch an item was in stopped before it had an outcome (its loop is shutting down)."""


@dataclass
class _Queue(Generic[Item, Result]):
    """One event loop's waiting items and its batch in flight."""

    waiting: list[tuple[Item, asyncio.Future[Result]]] = field(default_factory=list)
    draining: asyncio.Task[None] | None = None


class GroupCommit(Generic[Item, Result]):
    """Runs submitted items in batches through ``run_batch``, one batch at a time."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Awaitable[Sequence[Result | Exception]]],
        *,
        max_batch: int,
    ) -> None:
        if max_batch < 1:
            raise ValueError("a batch holds at least one item")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue[Item, Result]] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, item: Item) -> Result:
        """``item``'s outcome once its batch has run: its result, or its exception raised."""
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        future: asyncio.Future[Result] = loop.create_future()
        queue.waiting.append((item, future))
        if queue.draining is None:
            queue.draining = loop.create_task(self._drain(queue))
            queue.draining.add_done_callback(functools.partial(_strand_if_never_run, queue))
        return await future

    async def _drain(self, queue: _Queue[Item, Result]) -> None:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while queue.waiting:
                batch = queue.waiting[: self._max_batch]
                del queue.waiting[: self._max_batch]
                outcomes: Sequence[Result | Exception]
                try:
                    outcomes = await self._run_batch([item for item, _ in batch])
                except Exception as exc:
                    outcomes = [exc] * len(batch)
                if len(outcomes) != len(batch):
                    mismatch = RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
                    outcomes = [mismatch] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its waiter was cancelled
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                batch = []
        finally:
            _strand(queue, batch)


def _strand_if_never_run(queue: _Queue[Item, Result], drain: asyncio.Task[None]) -> None:
    """A drain cancelled before its first step (a shutdown cancelling every task at once) never
    ran, ``finally`` included: its waiters are told here, and the queue is free for the next
    item to start a drain. A drain that ran has done both itself (``draining`` is then no
    longer it), so a batch started since is left alone."""
    if queue.draining is drain:
        _strand(queue, [])


def _strand(
    queue: _Queue[Item, Result], batch: Sequence[tuple[Item, asyncio.Future[Result]]]
) -> None:
    """Free the queue for the next drain, and tell every item of ``batch`` and of the queue
    still waiting that its batch did not finish."""
    queue.draining = None
    stranded = [future for _, future in (*batch, *queue.waiting) if not future.done()]
    del queue.waiting[:]
    for future in stranded:
        future.set_exception(BatchNotFinished("the batch did not finish"))
