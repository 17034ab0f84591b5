"""A partition's MQTT session (GmqttSource) against real mosquitto: its own client id,
exactly its devices' filters, a device added at run time, and a detach that keeps the
session so that the next owner gets what was published meanwhile, in order."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.gmqtt_source import GmqttSource
from ingest.mqtt import BrokerURL, Received
from tests.servers import Process

pytestmark = pytest.mark.e2e

CLIENT = "cw-ingest-p03of16"


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


def publish(port: int, messages: list[tuple[str, int]]) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=paho.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = [
            c.publish(f"cw/v1/{d}/status", json.dumps({"boot": "b1", "seq": s}), qos=1)
            for d, s in messages
        ]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def seqs(got: list[Received], device: str) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in got if m.topic == f"cw/v1/{device}/status"]


async def test_the_next_owner_resumes_the_session_in_order(broker: Process, tmp_path: Path) -> None:
    url = BrokerURL.parse(broker.url)
    got: list[Received] = []
    first = GmqttSource(
        url, client_id=CLIENT, subscription=["cw/v1/A/+", "cw/v1/B/+"], deliver=got.append
    )
    async with first:
        await until(lambda: first.subacks >= 1, 10, "subscribed")
        await asyncio.to_thread(publish, broker.port, [("A", 0), ("C", 0)])
        await until(lambda: len(got) == 1, 10, "A's first message")
        assert first.ack(got[0])
    # detached: published now, kept in the session for the next owner
    await asyncio.to_thread(
        publish, broker.port, [(d, s) for s in range(1, 101) for d in ("A", "B", "C")]
    )
    got2: list[Received] = []
    second = GmqttSource(
        url, client_id=CLIENT, subscription=["cw/v1/A/+", "cw/v1/B/+"], deliver=got2.append
    )
    async with second:
        await until(lambda: len(got2) >= 200, 10, "what was queued")
        assert seqs(got2, "A") == list(range(1, 101))  # none lost, in order, A's 0 was acked
        assert seqs(got2, "B") == list(range(1, 101))
        assert seqs(got2, "C") == []  # not this partition's device
        for m in got2:
            second.ack(m)
        # a device added to the registry: subscribed without a restart
        assert second.add_subscription("cw/v1/C/+")
        assert not second.add_subscription("cw/v1/C/+")
        await until(lambda: second.subacks >= 2, 10, "C subscribed")
        await asyncio.to_thread(publish, broker.port, [("C", 500)])
        await until(lambda: seqs(got2, "C") == [500], 10, "C's message")
    assert second.subscriptions == ["cw/v1/A/+", "cw/v1/B/+", "cw/v1/C/+"]


async def test_many_filters_go_in_batches(broker: Process) -> None:
    devices = [f"D{i:04d}" for i in range(250)]
    got: list[Received] = []
    src = GmqttSource(
        BrokerURL.parse(broker.url),
        client_id="cw-ingest-p0of1",
        subscription=[f"cw/v1/{d}/+" for d in devices],
        deliver=got.append,
    )
    async with src:
        await until(lambda: src.subacks == 3, 10, "three SUBACKs for 250 filters")
        await asyncio.to_thread(publish, broker.port, [("D0000", 1), ("D0249", 2)])
        await until(lambda: len(got) == 2, 10, "both ends of the list")
