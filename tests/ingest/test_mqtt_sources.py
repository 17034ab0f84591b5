"""Both MQTT sources (paho ``MqttSource``, gmqtt ``GmqttSource``) against real brokers.

The contract the pipeline relies on: a QoS 1 message is acknowledged only when ``ack`` is
called (after the store has it), only on the connection that delivered it, with at most
``max_inflight`` delivered and unacknowledged; the session survives reconnects and the
subscription is made again on every connect. "Acknowledged" is read back from the broker:
a message not acknowledged is delivered again to the next client with the same id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.workload import Stream, specs_of
from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest import pipeline as pipeline_module
from ingest.broker import EmbeddedBroker
from ingest.config import IngestConfig
from ingest.gmqtt_source import GmqttSource
from ingest.mqtt import BrokerURL, MqttSource, Received
from ingest.service import Ingest
from ingest.sqlite_store import SQLiteStore
from tests.servers import free_port, mosquitto

pytestmark = pytest.mark.e2e

SUB = "cw/v1/+/+"
SENTINEL = "cw/v1/SENTINEL/status"


Source = MqttSource | GmqttSource
SOURCES: dict[str, type[Source]] = {"paho": MqttSource, "gmqtt": GmqttSource}


async def until(check: Callable[[], bool], within: float = 15.0, what: str = "") -> None:
    """Bounded polling on the loop (the sources work on it meanwhile)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


def prime(port: int, client_id: str) -> None:
    """A persistent session subscribed to SUB: the broker queues from now on."""
    done = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=paho.MQTTv311,
    )
    c.on_subscribe = lambda *a: done.set()
    c.on_connect = lambda client, *a: client.subscribe(SUB, qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert done.wait(10), "subscribing timed out"
    finally:
        c.disconnect()
        c.loop_stop()


def publish(port: int, messages: list[tuple[str, bytes]], *, retain: bool = False) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-pub", protocol=paho.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for info in [c.publish(t, p, qos=1, retain=retain) for t, p in messages]:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def left_in_session(port: int, client_id: str) -> list[bytes]:
    """What the broker still holds for ``client_id``: everything it delivers to a new client
    with that id before a sentinel published after that client connected."""
    got: list[bytes] = []
    seen_sentinel = threading.Event()
    connected = threading.Event()

    def on_message(client: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        if m.topic == SENTINEL:
            seen_sentinel.set()
        elif not seen_sentinel.is_set():
            got.append(bytes(m.payload))

    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=paho.MQTTv311,
    )
    c.on_message = on_message
    c.on_subscribe = lambda *a: connected.set()
    c.on_connect = lambda client, *a: client.subscribe(SUB, qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert connected.wait(10)
        publish(port, [(SENTINEL, b"end")])
        assert seen_sentinel.wait(10), "the sentinel never came back"
    finally:
        c.disconnect()
        c.loop_stop()
    return got


def numbered(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"cw/v1/T{i:03d}/status", str(i).encode()) for i in range(start, start + n)]


class Sink:
    """``deliver``: keeps what arrives, and the most delivered-but-unacked seen at once."""

    def __init__(self) -> None:
        self.got: list[Received] = []
        self.acked = 0
        self.most_outstanding = 0

    def __call__(self, r: Received) -> None:
        self.got.append(r)
        self.most_outstanding = max(self.most_outstanding, len(self.got) - self.acked)

    def payloads(self) -> list[bytes]:
        return [r.payload for r in self.got]


@pytest.fixture(params=sorted(SOURCES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def source(kind: str, port: int, client_id: str, sink: Sink, **options: Any) -> Source:
    return SOURCES[kind](
        BrokerURL("127.0.0.1", port),
        client_id=client_id,
        subscription=SUB,
        deliver=sink,
        **options,
    )


# -- acknowledgement --------------------------------------------------------------------------


async def test_only_acked_messages_leave_the_session(kind: str, tmp_path: Path) -> None:
    with mosquitto(tmp_path / "mosquitto") as broker:
        port, cid = broker.port, f"acks-{kind}"
        await asyncio.to_thread(prime, port, cid)
        await asyncio.to_thread(publish, port, numbered(10))
        sink = Sink()
        async with source(kind, port, cid, sink) as s:
            await until(lambda: len(sink.got) == 10, what="10 messages delivered")
            assert sink.payloads() == [str(i).encode() for i in range(10)]
            assert [s.ack(r) for r in sink.got if int(r.payload) % 2 == 0] == [True] * 5
        # nothing acked on receipt: the five not acked are still the broker's to deliver
        left = await asyncio.to_thread(left_in_session, port, cid)
        assert sorted(left, key=int) == [str(i).encode() for i in range(1, 10, 2)]


async def test_works_against_the_embedded_broker(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """amqtt speaks MQTT 3.1.1 only. (It does not deliver a resumed session's unacked
    messages again, with either client, so the session half is tested on mosquitto.)"""
    async with EmbeddedBroker("127.0.0.1", free_port()) as broker:
        port = broker.url.port
        sink = Sink()
        async with source(kind, port, f"embedded-{kind}", sink) as s:
            await until(lambda: s.connected, what="connected")
            await asyncio.to_thread(prime, port, "embedded-other")  # a SUBACK: ours is made
            await asyncio.to_thread(publish, port, numbered(10))
            await until(lambda: len(sink.got) == 10, what="10 messages delivered")
            assert sink.payloads() == [str(i).encode() for i in range(10)]
            assert {r.qos for r in sink.got} == {1}
            assert [s.ack(r) for r in sink.got] == [True] * 10
            await asyncio.to_thread(publish, port, numbered(1, start=10))  # after our PUBACKs
            await until(lambda: len(sink.got) == 11, what="the 11th")
    unknown = [r for r in caplog.records if "unknown pending message" in r.getMessage()]
    assert unknown == [], "amqtt did not recognise a PUBACK of ours"


async def test_an_ack_never_goes_to_a_newer_connection(kind: str, tmp_path: Path) -> None:
    with mosquitto(tmp_path / "mosquitto") as broker:
        cid = f"generations-{kind}"
        await asyncio.to_thread(prime, broker.port, cid)
        await asyncio.to_thread(publish, broker.port, numbered(5))
        sink = Sink()
        async with source(kind, broker.port, cid, sink) as s:
            await until(lambda: len(sink.got) == 5, what="5 messages delivered")
            first = s.generation
            await asyncio.to_thread(broker.stop)  # persistence on: the session survives
            await asyncio.to_thread(broker.start)
            await until(
                lambda: s.connected and s.generation > first and len(sink.got) == 10,
                within=30,
                what="reconnected and the 5 delivered again",
            )
            old, new = sink.got[:5], sink.got[5:]
            assert {r.payload for r in new} == {r.payload for r in old}
            assert {r.generation for r in new} == {s.generation}
            # the store has the first copies now; their connection is gone: no ack for them
            assert [s.ack(r) for r in old] == [False] * 5
            assert [s.ack(r) for r in new] == [True] * 5
        assert await asyncio.to_thread(left_in_session, broker.port, cid) == []


async def test_inflight_is_bounded_and_each_ack_frees_a_slot(kind: str, tmp_path: Path) -> None:
    with mosquitto(tmp_path / "mosquitto") as broker:
        cid = f"inflight-{kind}"
        await asyncio.to_thread(prime, broker.port, cid)
        await asyncio.to_thread(publish, broker.port, numbered(40))
        sink = Sink()
        async with source(kind, broker.port, cid, sink, max_inflight=3) as s:
            while sink.acked < 40:
                await until(lambda: len(sink.got) > sink.acked, what=f"message {sink.acked}")
                sink.acked += 1  # before ack(): it may deliver the next one at once
                assert s.ack(sink.got[sink.acked - 1])
        assert sink.payloads() == [str(i).encode() for i in range(40)]  # arrival order
        assert sink.most_outstanding == 3


async def test_reconnects_and_subscribes_again_when_the_broker_lost_the_session(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingest")
    with mosquitto(tmp_path / "mosquitto", persistence=False) as broker:
        sink = Sink()
        async with source(kind, broker.port, f"resubscribe-{kind}", sink) as s:
            await until(lambda: s.connected, what="connected")
            first = s.generation
            await asyncio.to_thread(broker.stop)
            await until(lambda: not s.connected, what="noticed the broker is gone")
            await asyncio.to_thread(broker.start)  # no persistence: no session, no subscription
            await until(lambda: s.connected and s.generation > first, within=30, what="back")
            # retained: it reaches the source whenever its new subscription is made
            await asyncio.to_thread(publish, broker.port, numbered(1, start=7), retain=True)
            await until(lambda: len(sink.got) == 1, what="the retained message")
            assert sink.got[0].payload == b"7"
            assert s.ack(sink.got[0])
    attempts = [r.getMessage() for r in caplog.records if "reconnect attempt" in r.getMessage()]
    assert attempts, "each reconnect attempt is logged"


async def test_says_on_every_connect_whether_the_broker_had_our_session(
    kind: str, tmp_path: Path
) -> None:
    """CONNACK's session present flag reaches ``on_session``: False for a new client id,
    True after a graceful broker restart (persistence on), False after a crash that lost
    the persistence file (kill -9, file gone)."""
    with mosquitto(tmp_path / "mosquitto") as broker:
        sessions: list[bool] = []
        sink = Sink()
        async with source(kind, broker.port, f"session-{kind}", sink, on_session=sessions.append):
            await until(lambda: sessions == [False], what="first connect, no session")
            await asyncio.to_thread(broker.stop)  # graceful: mosquitto saves the session
            await asyncio.to_thread(broker.start)
            await until(lambda: len(sessions) == 2, within=30, what="reconnected")
            assert sessions == [False, True]
            await asyncio.to_thread(broker.kill)
            (broker.workdir / "mosquitto.db").unlink(missing_ok=True)
            await asyncio.to_thread(broker.start)
            await until(lambda: len(sessions) == 3, within=30, what="reconnected after a crash")
            assert sessions == [False, True, False]


# -- ack after write, through the whole service -----------------------------------------------


class BlockingStore(SQLiteStore):
    """The real store, whose history write blocks until released."""

    entered: threading.Event
    release: threading.Event

    def append(self, rows: Any) -> None:
        self.entered.set()
        if not self.release.wait(30):
            raise TimeoutError("never released")
        super().append(rows)

    def close(self) -> None:  # Ingest closes it after its MQTT source is gone
        self.release.set()
        super().close()


def blocking_store(path: Path) -> BlockingStore:
    store = BlockingStore(path, synchronous="OFF")
    store.entered, store.release = threading.Event(), threading.Event()
    return store


def contract_messages(n: int) -> list[tuple[str, bytes]]:
    stream = Stream(specs_of(None), seed=3, births=True)
    return list(stream.messages(n, time.time_ns() // 1_000_000))


async def test_service_acks_only_after_the_store_write(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ingest dies while the store write blocks: the broker still has every message."""
    # the stop waits STOP_WAIT_S (10 s) for the blocked write, then goes on without it: the
    # same path in half a second
    monkeypatch.setattr(pipeline_module, "STOP_WAIT_S", 0.5)
    catalog = Catalog.load()
    scheme = TopicScheme()
    assert scheme.subscription == SUB
    messages = contract_messages(30)
    with mosquitto(tmp_path / "mosquitto") as broker:
        cid = f"ingest-{kind}"
        await asyncio.to_thread(prime, broker.port, cid)
        await asyncio.to_thread(publish, broker.port, messages)
        store = blocking_store(tmp_path / "history.db")
        config = IngestConfig(
            broker=broker.url, client_id=cid, data_dir=tmp_path / "data", mqtt_client=kind
        )
        async with Ingest(config, catalog, history=store) as ingest:
            assert type(ingest.source) is SOURCES[kind]
            await asyncio.to_thread(store.entered.wait, 15)
            assert store.entered.is_set(), "the pipeline never wrote"
            pipeline = ingest.pipeline
            assert pipeline is not None
            await until(lambda: pipeline.unacked == len(messages), what="all received")
            assert ingest.metrics.acked._value.get() == 0
        assert "stopping with a store write still in progress" in caplog.text
        left = await asyncio.to_thread(left_in_session, broker.port, cid)
        assert sorted(left) == sorted(p for _, p in messages)
