"""Re-identification under load: the opens that arrive while a batch of opens is being logged
are logged together, as the next batch (group commit).

Guarantees, on top of ``service.open_packets``'s:
- a batch is one transaction of its own, committed before ``log`` returns: the caller decrypts
  (``service.reveal``) only after its open's ``packet.open`` entry is durable. A batch whose
  transaction fails reveals nothing, and every open in it gets that failure (503 when the log
  could not be written within its bound, with nothing written);
- an open waits for the log at most the bound (``log_lock_timeout_seconds``) counted from its
  arrival, also when it first waited for the batch ahead of it;
- one open's refusal is that open's alone;
- the opens of one worker process run one batch at a time; the log's lock orders the batches
  of every process, so their entries form one gap-free sequence, as single appends do;
- on SQLite a batch runs on the event loop when the write lock is free: it never waits for the
  lock there (it tries again a moment later, letting other requests run, and after
  ``POLL_ON_LOOP_SECONDS`` waits in a worker thread), so a held lock never stalls the worker;
  its work is a few statements and one commit. On PostgreSQL, where every statement is a
  network round trip, a batch runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from service.db import LOG_LOCK_TIMEOUT_OPTION, Database, lock_was_busy, make_engine
from service.errors import ServiceError
from service.group_commit import GroupCommit
from service.packets import service
from service.packets.service import OpenRequest, SealedPacket

# Opens logged in one transaction at most: more than a worker's connections usually send at
# once, few enough that one batch's member rows stay small.
MAX_BATCH = 32
# However late an open's batch starts, it still tries this long for the log's lock.
MIN_LOCK_WAIT_SECONDS = 0.01
# SQLite: how long a batch tries for the write lock from the event loop (the first pause, then
# doubling), before it waits for the lock in a thread.
FIRST_RETRY_SECONDS = 0.0002
POLL_ON_LOOP_SECONDS = 0.02

Outcomes = list[SealedPacket | ServiceError]


class _LockTaken(Exception):
    """The transaction's lock is held elsewhere right now; nothing was done."""


@dataclass(frozen=True)
class _Pending:
    request: OpenRequest
    deadline: float  # time.monotonic() by which its log entry must be written


class PacketOpens:
    """This worker's batches of packet opens."""

    def __init__(self, *, database: Database, bound_seconds: float) -> None:
        self.bound_seconds = bound_seconds
        self._sessions: Callable[[], Session] = database.session
        self._own_engine: Engine | None = None
        if database.is_sqlite:
            # The loop never waits for a connection that a request in a thread holds: its
            # batches (one at a time) have an engine of their own, with its own writer's turn.
            self._own_engine = make_engine(
                database.url, lock_timeout_seconds=bound_seconds, sqlite_pool_size=1
            )
            engine = self._own_engine
            self._sessions = lambda: Session(engine, expire_on_commit=False)
        self._batches: GroupCommit[_Pending, SealedPacket] = GroupCommit(
            self._log_on_loop if database.is_sqlite else self._log_in_thread,
            max_batch=MAX_BATCH,
        )

    def dispose(self) -> None:
        if self._own_engine is not None:
            self._own_engine.dispose()

    async def log(self, request: OpenRequest) -> SealedPacket:
        """The open, logged and committed (ciphertexts and wraps only); its refusal
        (``PacketNotFound``, ``PacketGone``) or the log's failure is raised."""
        deadline = time.monotonic() + self.bound_seconds
        return await self._batches.submit(_Pending(request, deadline))

    async def _log_in_thread(self, batch: Sequence[_Pending]) -> Outcomes:
        lock_wait = max(MIN_LOCK_WAIT_SECONDS, min(p.deadline for p in batch) - time.monotonic())
        return await asyncio.get_running_loop().run_in_executor(
            None, self._transaction, batch, lock_wait
        )

    async def _log_on_loop(self, batch: Sequence[_Pending]) -> Outcomes:
        """Take the write lock only when it is free (trying again after short pauses, while the
        loop serves other requests); if it stays taken, wait for it in a thread instead, where
        the kernel wakes the waiter as the holder lets go: a worker whose neighbour keeps the
        lock busy still gets its turn."""
        on_loop_until = time.monotonic() + POLL_ON_LOOP_SECONDS
        pause = FIRST_RETRY_SECONDS
        while True:
            try:
                return self._transaction(batch, 0.0)
            except _LockTaken:
                pass
            if time.monotonic() + pause > on_loop_until:
                return await self._log_in_thread(batch)
            await asyncio.sleep(pause)
            pause *= 2

    def _transaction(self, batch: Sequence[_Pending], lock_wait: float) -> Outcomes:
        """The batch's opens in one committed transaction that waits at most ``lock_wait`` for
        its lock; with 0, ``_LockTaken`` (nothing done) unless the lock is free now."""
        with self._sessions() as session:
            try:
                try:
                    session.connection(execution_options={LOG_LOCK_TIMEOUT_OPTION: lock_wait})
                except OperationalError as exc:
                    if lock_wait == 0 and lock_was_busy(exc):
                        raise _LockTaken from None
                    raise
                outcomes = service.open_packets(
                    session=session, requests=[p.request for p in batch]
                )
                session.commit()
            except BaseException:
                session.rollback()
                raise
        return outcomes
