"""A small district for API and page tests: the shipped stations (same names and places),
each with its first pile and first cabinet, plus a station the fleet never runs (for
hand-published stale and offline devices). A fleet of simulated devices runs on its own
event loop thread so that sync tests can inject changes while they poll over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt

from devices.catalog import Catalog
from simulators.config import BrokerAddress, FleetConfig
from simulators.fleet import Fleet
from simulators.truth import TruthLog
from tests.pg_server import PgServer
from tests.servers import Process, Service, chargewatch_serve, mosquitto

T = TypeVar("T")

HAND_STATION = "hand-test"
HAND_PILE = "HND-P01"
HAND_CABINET = "HND-C01"


def mini_catalog(path: Path, *, hand: bool = True, per_station: int = 1) -> Catalog:
    """The district's stations with ``per_station`` piles and cabinets each."""
    data = json.loads(
        (Path(__file__).resolve().parents[2] / "devices/data/district.json").read_text()
    )
    for station in data["stations"]:
        piles = [d for d in station["devices"] if d["kind"] == "pile"][:per_station]
        cabinets = [d for d in station["devices"] if d["kind"] == "cabinet"][:per_station]
        station["devices"] = piles + cabinets
    if hand:
        data["stations"].append(
            {
                "id": HAND_STATION,
                "name": {"zh": "测试站", "en": "Hand Test Station"},
                "lat": 31.7520,
                "lon": 117.3100,
                "address": {"zh": "测试路 1 号", "en": "1 Test Road"},
                "site_kind": "roadside",
                "devices": [
                    {"id": HAND_PILE, "kind": "pile", "ports": 4},
                    {"id": HAND_CABINET, "kind": "cabinet", "slots": 4},
                ],
            }
        )
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return Catalog.load(path)


class FleetThread:
    """``Fleet`` running on an event loop in its own thread; ``call`` runs a function there."""

    def __init__(
        self, catalog: Catalog, config: FleetConfig, truth: Path | None, only: list[str]
    ) -> None:
        self.catalog, self.config, self.truth_path, self.only = catalog, config, truth, only
        self.loop = asyncio.new_event_loop()
        self.fleet: Fleet | None = None
        self._ready: Future[None] = Future()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        truth = TruthLog(self.truth_path) if self.truth_path else None
        if truth is not None:
            await truth.__aenter__()
        try:
            async with Fleet(self.catalog, self.config, truth=truth, only=self.only) as fleet:
                self.fleet = fleet
                await asyncio.wait_for(fleet.ready(), 30)
                if self.config.duration_s is not None:
                    await asyncio.wait_for(fleet.hold(), 120)
                self._ready.set_result(None)
                await self._stop.wait()
        finally:
            if truth is not None:
                await truth.__aexit__(None, None, None)

    def start(self) -> None:
        self._thread.start()
        self._ready.result(timeout=150)

    def call(self, fn: Callable[[Fleet], T]) -> T:
        """Run ``fn(fleet)`` on the fleet's loop and return its result."""

        async def run() -> T:
            assert self.fleet is not None
            return fn(self.fleet)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def settle(self) -> None:
        async def run() -> None:
            assert self.fleet is not None
            await self.fleet.settle()

        asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)


@contextmanager
def running_fleet(
    catalog: Catalog,
    port: int,
    *,
    only: list[str],
    start: datetime | None = None,
    speed: float = 1.0,
    duration_s: float | None = 0.0,
    truth: Path | None = None,
    seed: int = 3,
) -> Iterator[FleetThread]:
    """Devices ``only`` of ``catalog`` on the broker at ``port``; ``duration_s=0`` freezes
    their behaviour at once, so only injections change them."""
    config = FleetConfig(
        broker=BrokerAddress("127.0.0.1", port),
        seed=seed,
        speed=speed,
        start=start,
        duration_s=duration_s,
        fault_rate=0.0,
    )
    runner = FleetThread(catalog, config, truth, only)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


class Publisher:
    """A plain MQTT client publishing contract messages by hand for one device."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.seq = 0

    def send(self, channel: str, body: dict[str, Any]) -> None:
        retain = channel != "event"
        payload = {"v": 1, "boot": "hand0001", "seq": self.seq, **body}
        self.seq += 1
        info = self.client.publish(
            f"cw/v1/{self.device_id}/{channel}", json.dumps(payload), qos=1, retain=retain
        )
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class District:
    broker: Process
    service: Service
    catalog: Catalog
    fleet: FleetThread

    def get(self, path: str, **params: object) -> Any:
        response = self.service.get(path, **params)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()


@contextmanager
def serve_district(tmp: Path, *, hand: bool = True) -> Iterator[District]:
    """mosquitto + ``chargewatch serve`` on the small district, its fleet frozen (only
    injections change it); the hand station's devices are left to the tests."""
    catalog = mini_catalog(tmp / "catalog.json", hand=hand)
    with (
        mosquitto(tmp / "mosquitto") as broker,
        chargewatch_serve(tmp / "serve", broker.url, "--catalog", str(tmp / "catalog.json")) as svc,
    ):
        run = [d.id for d in catalog.devices.values() if d.station_id != HAND_STATION]
        with running_fleet(catalog, broker.port, only=run) as fleet:
            yield District(broker, svc, catalog, fleet)


@contextmanager
def cluster_district(tmp: Path, pg: PgServer, *, hand: bool = True) -> Iterator[District]:
    """The same small district through the scaled-out shape: mosquitto, a database on
    ``pg``, two ``chargewatch ingest`` workers and one ``chargewatch api`` replica, which
    is the district's ``service`` (``tests.cluster.processes``)."""
    from tests.cluster.processes import cluster

    catalog = mini_catalog(tmp / "catalog.json", hand=hand)
    with cluster(tmp / "cluster", pg, catalog=tmp / "catalog.json", workers=2, replicas=1) as c:
        run = [d.id for d in catalog.devices.values() if d.station_id != HAND_STATION]
        with running_fleet(catalog, c.broker.port, only=run) as fleet:
            yield District(c.broker, c.replicas[0], catalog, fleet)


@contextmanager
def district(backend: str, tmp: Path, request: Any, *, hand: bool = True) -> Iterator[District]:
    """``serve_district`` (backend ``serve``: SQLite) or ``cluster_district`` (``cluster``:
    PostgreSQL, the session's server from the ``pg_session`` fixture)."""
    if backend == "serve":
        with serve_district(tmp, hand=hand) as d:
            yield d
    elif backend == "cluster":
        with cluster_district(tmp, request.getfixturevalue("pg_session"), hand=hand) as d:
            yield d
    else:
        raise ValueError(f"backend {backend!r}: serve or cluster")


BACKENDS = ["serve", "cluster"]


def artifacts_dir() -> Path:
    out = Path(__file__).resolve().parents[2] / "test-artifacts"
    out.mkdir(exist_ok=True)
    return out
