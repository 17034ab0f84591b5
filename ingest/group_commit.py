"""Group commit: the batches of a worker's partitions written in shared transactions.

Each owned partition writes its batch and waits for it to be durable before it acknowledges
(``ingest.partition_consumer``). Alone, every batch would be a transaction of its own, and a
transaction costs a worker about as much as a few dozen messages whatever its size
(docs/benchmarks.md): a worker of 16 partitions fed at a modest rate writes many small ones.
Here, while one transaction is being written, the batches that arrive meanwhile wait and
then go together in the next one, each partition's lease checked in it
(``PostgresStore.write_fenced``): a stale owner's batch is refused alone (``StaleLease``)
while its neighbours commit. As in a database's own group commit, nothing waits on purpose:
a lone batch is written at once, and the busier the worker, the fuller each transaction.

A write that fails for another reason than the database being away is tried again one batch
a transaction, so that one partition's bad batch fails only that partition.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter

from ingest import StoreError, StoreUnavailable
from ingest.leases import StaleLease, holds
from ingest.pg_store import Part, PostgresStore

log = logging.getLogger(__name__)

_Waiting = tuple[Part, "asyncio.Future[None]"]


class GroupCommit:
    """One worker's fenced state writes (``write``), grouped while one is in flight."""

    def __init__(self, store: PostgresStore, committed: Counter | None = None) -> None:
        self.store = store
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None
        self.transactions = 0  # committed (a stale part's refusal among them)
        self._committed = committed

    async def write(self, part: Part) -> None:
        """``part`` durable, under its fence (``StaleLease`` if the lease moved on), in the
        next transaction. Cancelled, the write still happens: only the wait is given up, as a
        thread's write would be (the caller acknowledges nothing it did not see durable)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((part, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="group-commit")
        await done

    async def _write_all(self) -> None:
        """Until nobody waits: all that waits, in one transaction. Every waiter hears how
        its own part went; this task itself never fails with a write's error."""
        try:
            while self._waiting:
                taken, self._waiting = self._waiting, []
                try:
                    await self._commit(taken)
                except StoreError as exc:
                    if len(taken) == 1 or isinstance(exc, StoreUnavailable):
                        _fail(taken, exc)
                        continue
                    log.warning(
                        "%d batches written together failed (%s): one by one", len(taken), exc
                    )
                    for one in taken:
                        try:
                            await self._commit([one])
                        except StoreError as alone:
                            _fail([one], alone)
                except Exception as exc:  # a bug: every waiter hears it, none hangs
                    _fail(taken, exc)
        except BaseException as exc:  # cancelled with the loop: nobody is left waiting
            _fail(self._waiting, StoreUnavailable(f"the write was abandoned ({exc!r})"))
            self._waiting = []
            raise

    async def _commit(self, taken: list[_Waiting]) -> None:
        try:
            stale = await asyncio.to_thread(self.store.write_fenced, [p for p, _ in taken], holds)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: the waiters hear of it, then up
                _fail(taken, StoreUnavailable(f"the write was abandoned ({exc!r})"))
            raise
        self.transactions += 1
        if self._committed is not None:
            self._committed.inc()
        for i, (part, done) in enumerate(taken):
            if done.done():  # its waiter gave up
                continue
            if i in stale:
                assert part.fence is not None
                partition, epoch = part.fence
                done.set_exception(
                    StaleLease(f"partition {partition}: epoch {epoch} is no longer the lease's")
                )
            else:
                done.set_result(None)


def _fail(taken: list[_Waiting], exc: BaseException) -> None:
    for _, done in taken:
        if not done.done():
            done.set_exception(exc)
