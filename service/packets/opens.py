"""Re-identification under load: the opens that arrive while a batch of opens is being logged
are logged together, as the next batch (group commit).

Guarantees, on top of ``service.open_packets``'s:
- a batch is one transaction of its own, committed before ``log`` returns: the caller decrypts
  (``service.reveal``) only after its open's ``packet.open`` entry is durable. A batch whose
  transaction fails reveals nothing and writes nothing, and its opens get that failure (but see
  the next point for a lock wait that ran out);
- an open waits for the locks it needs at most the bound (``log_lock_timeout_seconds``) counted
  from its arrival, also when it first waited for the batch ahead of it: when a batch's wait
  runs out, only the opens past their own bound get 503, and the others try again;
- one open's refusal is that open's alone, and so is a packet being changed: on PostgreSQL a
  batch skips a packet whose row another transaction holds (a close, reassign, shred or erasure
  in progress), and that open waits for it on its own, off the batches (the change may make the
  caller its owner); when that wait runs out, the caller gets 503 if the committed row says the
  packet is theirs, and otherwise the logged 404 anyone gets for a packet not theirs;
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from service.access_log.service import LogUnavailable
from service.db import (
    LOG_LOCK_TIMEOUT_OPTION,
    MIN_LOCK_WAIT_SECONDS,
    Database,
    lock_was_busy,
    make_engine,
)
from service.errors import ServiceError
from service.group_commit import GroupCommit
from service.packets import service
from service.packets.service import OpenRequest, SealedPacket

# Opens logged in one transaction at most: more than a worker's connections usually send at
# once, few enough that one batch's member rows stay small.
MAX_BATCH = 32
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
        # The batches run one at a time, in a thread of their own: the opens waiting on their
        # own for a packet being changed (each holding a thread of the loop's default executor
        # for up to the bound) can never leave the next batch without one. Made when first
        # needed, so an app served again after ``dispose`` gets a new one.
        self._batch_thread: ThreadPoolExecutor | None = None
        self._batches: GroupCommit[_Pending, SealedPacket] = GroupCommit(
            self._log_on_loop if database.is_sqlite else self._log_in_thread,
            max_batch=MAX_BATCH,
        )

    def dispose(self) -> None:
        thread, self._batch_thread = self._batch_thread, None
        if thread is not None:
            thread.shutdown(wait=True)
        if self._own_engine is not None:
            self._own_engine.dispose()

    async def log(self, request: OpenRequest) -> SealedPacket:
        """The open, logged and committed (ciphertexts and wraps only); its refusal
        (``PacketNotFound``, ``PacketGone``) or the log's failure is raised."""
        pending = _Pending(request, time.monotonic() + self.bound_seconds)
        try:
            return await self._batches.submit(pending)
        except service.PacketLocked:
            # Its packet is being closed, reassigned, shredded or erased (PostgreSQL): it waits
            # for that on its own, in a thread, while the batches go on without it.
            loop = asyncio.get_running_loop()
            (outcome,) = await loop.run_in_executor(None, self._until_deadlines, [pending], False)
            if isinstance(outcome, LogUnavailable):
                # The wait ran out: someone the committed row does not admit gets the logged
                # 404 anyone gets for a packet not theirs, not a 503 that says it exists.
                outcome = await loop.run_in_executor(None, self._judged_as_held, pending)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _log_in_thread(self, batch: Sequence[_Pending]) -> Outcomes:
        if self._batch_thread is None:
            self._batch_thread = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="open-batches"
            )
        return await asyncio.get_running_loop().run_in_executor(
            self._batch_thread, self._until_deadlines, batch, True
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
                return self._transaction(batch, 0.0, skip_locked=True)
            except _LockTaken:
                pass
            if time.monotonic() + pause > on_loop_until:
                return await self._log_in_thread(batch)
            await asyncio.sleep(pause)
            pause *= 2

    def _judged_as_held(self, pending: _Pending) -> SealedPacket | ServiceError:
        """An open whose wait for its packet ran out, judged by the packet's committed row:
        refused (and logged) if it is not the caller's; still 503 for its owner."""
        # Its deadline has passed: one short try for the locks, with the usual outcome when
        # that runs out too.
        (outcome,) = self._until_deadlines([pending], True, deny_held=True)
        if isinstance(outcome, LogUnavailable | service.PacketLocked):
            return LogUnavailable(
                "the packet or the access log is busy; the request was not carried out, try again"
            )
        return outcome

    def _until_deadlines(
        self, batch: Sequence[_Pending], skip_locked: bool, *, deny_held: bool = False
    ) -> Outcomes:
        """The batch's opens, each waiting for the locks it needs until its own deadline: the
        transaction waits as long as its earliest open may, and when that runs out, the opens
        past their deadline get 503 and the others try again."""
        outcomes: dict[int, SealedPacket | ServiceError] = {}
        left = list(range(len(batch)))
        while left:
            earliest = min(batch[number].deadline for number in left)
            lock_wait = max(MIN_LOCK_WAIT_SECONDS, earliest - time.monotonic())
            try:
                done = self._transaction(
                    [batch[number] for number in left],
                    lock_wait,
                    skip_locked=skip_locked,
                    deny_held=deny_held,
                )
            except (LogUnavailable, OperationalError) as exc:
                if isinstance(exc, OperationalError) and not lock_was_busy(exc):
                    raise
                now = time.monotonic()
                expired = [n for n in left if batch[n].deadline <= now + MIN_LOCK_WAIT_SECONDS]
                if not expired:
                    raise  # refused sooner than any open's bound: not a wait that ran out
                for number in expired:
                    outcomes[number] = LogUnavailable(
                        "the access log is busy; the request was not carried out, try again"
                    )
                left = [number for number in left if number not in expired]
                continue
            outcomes.update(zip(left, done, strict=True))
            break
        return [outcomes[number] for number in range(len(batch))]

    def _transaction(
        self,
        batch: Sequence[_Pending],
        lock_wait: float,
        *,
        skip_locked: bool,
        deny_held: bool = False,
    ) -> Outcomes:
        """The batch's opens in one committed transaction whose every lock wait lasts at most
        ``lock_wait``; with 0, ``_LockTaken`` (nothing done) unless the lock is free now."""
        deadline = time.monotonic() + lock_wait if lock_wait > 0 else None
        with self._sessions() as session:
            try:
                try:
                    session.connection(execution_options={LOG_LOCK_TIMEOUT_OPTION: lock_wait})
                except OperationalError as exc:
                    if lock_wait == 0 and lock_was_busy(exc):
                        raise _LockTaken from None
                    raise
                outcomes = service.open_packets(
                    session=session,
                    requests=[p.request for p in batch],
                    skip_locked=skip_locked,
                    deny_held=deny_held,
                    deadline=deadline,
                )
                session.commit()
            except BaseException:
                session.rollback()
                raise
        return outcomes
