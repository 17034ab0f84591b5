"""Partition leases against a real PostgreSQL: join, fair split, loss and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from ingest.db import migrate
from ingest.leases import LeaseConfig, LeaseManager, StaleLease, assign, check_fence
from tests.cluster.leasecheck import RecordingOwner, Sampler, held_from_log, overlaps
from tests.pg_server import PgServer, postgresql

pytestmark = pytest.mark.e2e

N = 16
LEASE_S = 2.0  # health check every 0.2 s, at most 0.5 s; grace 0.7 s


async def until(check: Callable[[], bool], within: float, what: str) -> float:
    """Bounded polling on the loop; the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def worker(url: str, name: str) -> tuple[LeaseManager, RecordingOwner]:
    owner = RecordingOwner(name)
    cfg = LeaseConfig(partitions=N, worker=name, lease_timeout_s=LEASE_S, reconnect_max_s=1)
    return LeaseManager(url, cfg, owner), owner


@contextlib.asynccontextmanager
async def sampling(sampler: Sampler) -> AsyncIterator[Sampler]:
    task = asyncio.create_task(sampler.run())
    try:
        yield sampler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sampler.close()
    assert sampler.violations == [], sampler.violations[:5]
    assert sampler.samples > 20


@pytest.mark.parametrize(
    ("members", "sizes"),
    [
        ([7], [16]),
        ([3, 1], [8, 8]),
        ([5, 2, 9], [6, 5, 5]),
        ([1, 2, 3, 4, 5, 6, 7], [3] * 2 + [2] * 5),
    ],
)
def test_assign_is_fair_and_the_same_for_everyone(members: list[int], sizes: list[int]) -> None:
    got = assign(N, members)
    assert got == assign(N, list(reversed(members)))  # order of discovery does not matter
    assert [len(got[m]) for m in sorted(members)] == sizes
    assert sorted(p for ps in got.values() for p in ps) == list(range(N))
    assert assign(N, []) == {}


def test_the_log_check_finds_two_workers_owning_one_partition() -> None:
    """What test_workers_e2e reads from the workers' logs (``held_from_log``, ``overlaps``)
    can fail: a handover after the release passes, an owner that took its partition before
    the other let go (or at an old epoch) does not."""
    a = held_from_log(
        "2026-12-03 03:00:00,000 INFO ingest.leases: partition 3: ours (epoch 1)\n"
        "2026-12-03 03:00:00,100 INFO ingest.leases: partition 4: ours (epoch 1)\n"
        "2026-12-03 03:00:05,000 INFO ingest.leases: partition 3: released\n"
        "2026-12-03 03:00:06,000 ERROR ingest.leases: lease database lost (terminating\n"
        "connection due to administrator command): dropped partitions [4]\n",
        "a",
    )
    assert [(h.partition, h.epoch, round(h.end - h.start, 3)) for h in a] == [
        (3, 1, 5.0),
        (4, 1, 5.9),
    ]
    b = held_from_log(
        "2026-12-03 03:00:05,700 INFO ingest.leases: partition 3: ours (epoch 2)\n"
        "2026-12-03 03:00:05,900 INFO ingest.leases: partition 4: ours (epoch 2)\n",
        "b",
        until=a[0].end + 4,  # seen dead at 03:00:09
    )
    assert [round(h.end - h.start, 3) for h in b] == [3.3, 3.1]
    assert overlaps(a + b) == [
        f"partition 4: b (epoch 2) from {b[1].start:.3f}, a (epoch 1) until {a[1].end:.3f}"
    ]
    late = held_from_log(
        "2026-12-03 03:00:07,000 INFO ingest.leases: partition 3: ours (epoch 1)", "c"
    )
    assert overlaps(a[:1] + late) == ["partition 3: c took epoch 1 after a's 1"]
    assert overlaps(a[:1] + b[:1]) == []  # partition 3: released, then taken


async def test_one_takes_all_a_second_joins_for_a_fair_split_and_leaves(pg_url: str) -> None:
    a, owner_a = worker(pg_url, "a")
    b, owner_b = worker(pg_url, "b")
    async with sampling(Sampler(pg_url, [a, b])), a:
        await until(lambda: len(a.owned) == N, 10, "a owns every partition")
        assert owner_a.consuming == a.owned
        epochs_before = dict(a.owned)
        async with b:
            await until(lambda: len(a.owned) == len(b.owned) == N // 2, 10, "an 8/8 split")
            assert set(a.owned).isdisjoint(b.owned)
            assert owner_b.consuming == b.owned
            # what moved to b was released by a first, and got a new epoch
            for p, epoch in b.owned.items():
                assert epoch == epochs_before[p] + 1
                released = [t for t, what, q, _ in owner_a.events if what == "released" and q == p]
                taken = [t for t, what, q, _ in owner_b.events if what == "acquired" and q == p]
                assert released
                assert taken
                assert released[-1] < taken[0]
        # b left cleanly: a takes everything again
        await until(lambda: len(a.owned) == N, 10, "a owns every partition again")
        assert owner_b.consuming == {}
    assert owner_a.consuming == {}  # a released everything at its own exit
    assert all(what != "dropped_all" for _, what, _, _ in owner_a.events + owner_b.events)


async def test_a_terminated_lease_connection_moves_its_partitions(
    pg_session: PgServer, pg_url: str
) -> None:
    a, owner_a = worker(pg_url, "a")
    b, owner_b = worker(pg_url, "b")
    killed_at: list[float] = []

    exempt = lambda m: m is b and bool(killed_at)  # noqa: E731
    async with sampling(Sampler(pg_url, [a, b], exempt=exempt)), a, b:
        await until(lambda: len(a.owned) == len(b.owned) == N // 2, 10, "an 8/8 split")
        b_had = dict(b.owned)
        pid = b.backend_pid
        db = pg_url.rsplit("/", 1)[1]
        killed_at.append(time.monotonic())
        assert pg_session.psql(f"SELECT pg_terminate_backend({pid})", db) == "t"
        # b stops acknowledging within one health check and its timeout
        await until(lambda: b.losses == 1, a.config.grace_s + 0.3, "b drops everything")
        assert owner_b.consuming == {}

        # every partition b had is taken again (new epoch) within the lease timeout
        def moved() -> bool:
            return all(
                any(
                    what == "acquired" and q == p and e > b_had[p] and t > killed_at[0]
                    for o in (owner_a, owner_b)
                    for t, what, q, e in o.events
                )
                for p in b_had
            )

        took = await until(moved, LEASE_S, "b's partitions move")
        # and the workers settle on a fair split again (b rejoined)
        await until(lambda: len(a.owned) == len(b.owned) == N // 2, 10, "an 8/8 split")
    print(f"partitions moved {took:.2f}s after the lease connection was terminated")


async def test_the_database_stopped_drops_everything_then_everything_is_taken_again() -> None:
    with postgresql() as pg:
        url = pg.url()
        migrate.upgrade(url)
        a, owner_a = worker(url, "a")
        b, owner_b = worker(url, "b")
        down: list[float] = []

        async with sampling(Sampler(url, [a, b], exempt=lambda m: bool(down))), a, b:
            await until(lambda: len(a.owned) == len(b.owned) == N // 2, 10, "8/8")
            down.append(time.monotonic())
            await asyncio.to_thread(pg.process.stop, signal.SIGINT)  # fast shutdown
            await until(
                lambda: not a.held and not b.held, a.config.grace_s + 0.5, "everything dropped"
            )
            assert owner_a.consuming == owner_b.consuming == {}
            # nothing is taken while it is down
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                assert not a.held
                assert not b.held
                await asyncio.sleep(0.05)
            await asyncio.to_thread(pg.start)
            await until(
                lambda: len(a.owned) == len(b.owned) == N // 2, 15, "8/8 again after restart"
            )
            assert a.losses == b.losses == 1


async def test_fencing_refuses_a_stale_owner(pg_url: str) -> None:
    a, _ = worker(pg_url, "a")
    b, _ = worker(pg_url, "b")
    async with a:
        await until(lambda: len(a.owned) == N, 10, "a owns everything")
        old = a.owned[5]
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            async with conn.transaction():
                await check_fence(conn, 5, old)  # the current owner may write
            async with b:
                await until(lambda: 5 in b.owned, 10, "b takes partition 5")
                assert b.owned[5] > old
                with pytest.raises(StaleLease, match="partition 5"):
                    async with conn.transaction():
                        await check_fence(conn, 5, old)
                async with conn.transaction():
                    await check_fence(conn, 5, b.owned[5])


async def test_a_bad_database_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lease timeout"):
        LeaseConfig(partitions=N, worker="x", lease_timeout_s=0.1)
    with pytest.raises(ValueError, match="partition count"):
        LeaseConfig(partitions=0, worker="x")
