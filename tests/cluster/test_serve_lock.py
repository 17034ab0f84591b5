"""One ``serve`` per PostgreSQL database, and never beside ``chargewatch ingest`` workers
(``ingest.statedb.ServeLock``, ``ingest.leases.serve_holder``): a second serve, a serve on a
database where workers hold leases, and a worker on a database a serve holds are each refused
with a message that says who holds it; a serve's lock goes with its connection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from devices.catalog import Catalog
from ingest.alerts.config import AlertsConfig
from ingest.config import IngestConfig
from ingest.leases import SERVE_LOCK, LeaseConfig, LeaseError, LeaseManager
from ingest.mqtt import BrokerURL
from ingest.service import Ingest
from ingest.statedb import DatabaseInUse, ServeLock
from ingest.worker import IngestArgs, run_worker
from tests.cluster.leasecheck import RecordingOwner

pytestmark = pytest.mark.e2e


def _serve(tmp_path: Path, url: str, name: str) -> Ingest:
    config = IngestConfig(data_dir=tmp_path / name, db=url, housekeeping_s=3600)
    return Ingest(config, Catalog.load(), connect=False)


def _serve_locks(url: str) -> int:
    """Sessions holding serve's advisory lock on this database."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 1 AND classid = 0 AND objid = %s::oid"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (SERVE_LOCK,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_second_serve_on_one_database_is_refused(tmp_path: Path, pg_url: str) -> None:
    async with _serve(tmp_path, pg_url, "first") as first:
        assert _serve_locks(pg_url) == 1
        with pytest.raises(DatabaseInUse, match="another chargewatch serve") as refused:
            async with _serve(tmp_path, pg_url, "second"):
                pass
        message = str(refused.value)
        assert "chargewatch-serve" in message  # who holds it: its connection's name
        assert "\n" not in message
        assert first.ready or first.problems() == [f"not connected to the broker {None}"]
    assert _serve_locks(pg_url) == 0  # left with the first serve
    async with _serve(tmp_path, pg_url, "third"):
        assert _serve_locks(pg_url) == 1


async def test_serve_refuses_a_database_where_workers_hold_leases(
    tmp_path: Path, pg_url: str
) -> None:
    cfg = LeaseConfig(partitions=4, worker="w-east", lease_timeout_s=2.0)
    async with LeaseManager(pg_url, cfg, RecordingOwner("w-east")) as worker:
        deadline = time.monotonic() + 10
        while worker.member_id is None:
            assert time.monotonic() < deadline, "the worker did not join within 10 s"
            await asyncio.sleep(0.02)
        with pytest.raises(DatabaseInUse, match=r"workers .*w-east.* hold partition leases"):
            async with _serve(tmp_path, pg_url, "beside"):
                pass
    assert _serve_locks(pg_url) == 0  # a refused serve keeps nothing


async def test_a_worker_refuses_a_database_a_serve_holds(tmp_path: Path, pg_url: str) -> None:
    async with _serve(tmp_path, pg_url, "serve"):
        # the lease manager itself (the race: it checks after joining)
        owner = RecordingOwner("w-late")
        cfg = LeaseConfig(partitions=4, worker="w-late", lease_timeout_s=2.0)
        async with LeaseManager(pg_url, cfg, owner) as late:
            with pytest.raises(LeaseError, match=r"a chargewatch serve .* holds"):
                async with asyncio.timeout(10):
                    await late.finished()
        assert owner.events == []  # never told it owns anything
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM ingest_members").fetchone() == (0,)
        # `chargewatch ingest` refuses before it seeds the registry or sends an alert
        args = IngestArgs(
            broker=BrokerURL.parse("mqtt://127.0.0.1:1"), db=pg_url, catalog=Catalog.load(),
            partitions=4, worker="w1", metrics_port=None, history=None, lease_timeout_s=2,
            alerts=AlertsConfig(enabled=False),
        )  # fmt: skip
        with pytest.raises(LeaseError, match=r"a chargewatch serve .* holds"):
            await run_worker(args, asyncio.Event())
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM devices").fetchone() == (0,)


async def test_a_serves_lock_goes_with_its_connection(pg_url: str) -> None:
    async with ServeLock(pg_url, check_s=0.1) as held:
        assert held.backend_pid is not None
        with psycopg.connect(pg_url, autocommit=True) as admin:  # the serve "dies"
            admin.execute("SELECT pg_terminate_backend(%s)", (held.backend_pid,))
        async with ServeLock(pg_url) as successor:  # taken at once by the next one
            assert _serve_locks(pg_url) == 1
            # the first, still running, notices its loss and stops: never two serves
            with pytest.raises(DatabaseInUse, match="another chargewatch serve"):
                async with asyncio.timeout(10):
                    await held.run()
            assert successor.backend_pid is not None


async def test_a_serve_that_lost_its_connection_takes_its_lock_again(pg_url: str) -> None:
    async with ServeLock(pg_url, check_s=0.1) as held:
        first = held.backend_pid
        holding = asyncio.create_task(held.run())
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        deadline = time.monotonic() + 10
        while held.backend_pid in (first, None) or _serve_locks(pg_url) != 1:
            assert time.monotonic() < deadline, "the lock was not taken again within 10 s"
            assert not holding.done(), holding
            await asyncio.sleep(0.05)
        holding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holding


async def test_chargewatch_ingest_says_which_serve_holds_the_database(pg_url: str) -> None:
    async with ServeLock(pg_url):  # what `serve --db` holds
        argv = [sys.executable, "-m", "api.cli", "ingest", "--broker", "mqtt://127.0.0.1:1",
                "--db", pg_url]  # fmt: skip
        out = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
        )
    assert out.returncode == 1, out.stdout + out.stderr
    (said,) = [line for line in out.stdout.splitlines() if line.startswith("chargewatch ingest:")]
    assert said.startswith("chargewatch ingest: a chargewatch serve (chargewatch-serve ")
    assert said.endswith(
        f"holds {pg_url}: workers beside it would ingest the same devices twice; stop that serve"
        " first (the cluster is workers and `chargewatch api` replicas, without serve)"
    )
