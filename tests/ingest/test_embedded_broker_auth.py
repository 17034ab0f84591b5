"""The embedded broker (amqtt) given a credentials file enforces what the generated
mosquitto configuration does (tests/e2e/test_broker_auth.py), checked with plain paho
clients; without credentials it refuses to listen beyond loopback, and ``serve`` says so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest import BrokerConfigError
from ingest.broker import EmbeddedBroker
from ingest.brokerauth import Credentials
from tests.mqttclients import Client
from tests.servers import (
    chargewatch_argv,
    chargewatch_serve,
    eventually,
    free_port,
)

A, B = "WGS-P01", "WGS-C01"
CREDS = Credentials("chargewatch-ingest", "ingest-pw", {A: "a-pw", B: "b-pw"})


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    path = tmp_path / "credentials.json"
    path.write_text(CREDS.to_json())
    embedded = EmbeddedBroker("127.0.0.1", free_port(), credentials=path)
    asyncio.run(embedded.__aenter__())
    try:
        yield embedded
    finally:
        asyncio.run(embedded.__aexit__(None, None, None))


def device(broker: EmbeddedBroker, who: str, password: str | None = None, **kw: object) -> Client:
    return Client(broker.port, who, CREDS.devices[who] if password is None else password, **kw)  # type: ignore[arg-type]


def test_refuses_anonymous_and_wrong_passwords(broker: EmbeddedBroker) -> None:
    refused = [
        Client(broker.port),
        device(broker, A, "wrong"),
        device(broker, A, CREDS.devices[B]),
        Client(broker.port, "NOPE-01", "a-pw"),
        device(broker, A, client_id=B),  # a device's client id is its own id
        device(broker, A, will=(f"cw/v1/{B}/state", b"{}")),  # a Will as another
    ]
    for client in refused:
        try:
            assert client.connect().is_failure, client.client._client_id
        finally:
            client.close()
    ok = device(broker, A, will=(f"cw/v1/{A}/state", b"{}"))  # the control
    try:
        assert not ok.connect().is_failure
    finally:
        ok.close()


def test_topic_rules(broker: EmbeddedBroker) -> None:
    ingest = Client(broker.port, CREDS.ingest_username, CREDS.ingest_password)
    a, b = device(broker, A), device(broker, B)
    try:
        for client in (ingest, a, b):
            assert not client.connect().is_failure
        assert ingest.subscribe("cw/v1/+/+") == [1]
        assert ingest.subscribe("#") == [128]
        assert a.subscribe(f"cw/v1/{B}/cmd", "cw/v1/+/cmd", "cw/v1/#") == [128, 128, 128]
        assert a.subscribe(f"cw/v1/{A}/cmd") == [1]
        assert b.subscribe(f"cw/v1/{B}/cmd") == [1]
        # A as B, then as itself: only the latter reaches ingest (one connection, in order)
        a.publish(f"cw/v1/{B}/status", b'{"spoofed": true}')
        a.publish(f"cw/v1/{B}/cmd", b'{"spoofed": true}')
        a.publish(f"cw/v1/{A}/status", b'{"own": true}')
        ingest.wait_for(f"cw/v1/{A}/status")
        assert not [t for t in ingest.topics() if t.startswith(f"cw/v1/{B}/")]
        # commands: B gets its own, A gets only its own
        ingest.publish(f"cw/v1/{B}/cmd", b'{"cmd": 1}')
        ingest.publish(f"cw/v1/{A}/cmd", b'{"cmd": 2}')
        b.wait_for(f"cw/v1/{B}/cmd")
        a.wait_for(f"cw/v1/{A}/cmd")
        assert a.topics() == [f"cw/v1/{A}/cmd"]
        assert [m.payload for m in b.messages] == [b'{"cmd": 1}']  # not A's spoofed one
    finally:
        for client in (ingest, a, b):
            client.close()


def test_refuses_a_public_bind_without_credentials() -> None:
    with pytest.raises(BrokerConfigError, match="credentials"):
        EmbeddedBroker("0.0.0.0", 1883)
    EmbeddedBroker("::1", 1883)  # loopback is fine
    EmbeddedBroker("localhost", 1883)


def test_serve_refuses_a_public_embedded_broker_without_credentials(tmp_path: Path) -> None:
    result = subprocess.run(
        chargewatch_argv(
            "serve", "--broker-host", "0.0.0.0", "--broker-port", str(free_port()),
            "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
        ),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--broker-credentials" in result.stderr
    assert "0.0.0.0" in result.stderr


def test_serve_with_credentials_ingests_an_authenticated_device(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(CREDS.to_json())
    port = free_port()
    with chargewatch_serve(
        tmp_path / "serve", None, "--broker-credentials", str(path), broker_port=port
    ) as service:
        a = Client(port, A, CREDS.devices[A])
        anonymous = Client(port)
        try:
            assert anonymous.connect().is_failure
            assert not a.connect().is_failure
            birth = {"v": 1, "ts": int(time.time() * 1000), "boot": "boot1", "seq": 0,
                     "online": True, "kind": "pile", "ports": 10}  # fmt: skip
            a.publish(f"cw/v1/{A}/state", json.dumps(birth).encode())

            def online() -> None:
                lines = service.get("/metrics").text.splitlines()
                assert "chargewatch_devices_online 1.0" in lines

            eventually(online, timeout=15)
        finally:
            a.close()
            anonymous.close()


def test_a_device_gets_no_retained_message_of_another(broker: EmbeddedBroker) -> None:
    """amqtt 0.12.1, on every connect, sends the new client every retained message that
    matches ANY subscription in the broker (the ingest user's ``cw/v1/+/+`` included), with
    no ACL check: a device saw every other device's retained status (battery serials).
    Our broker sends a client only what its own subscriptions match and its rules allow."""
    ingest = Client(broker.port, CREDS.ingest_username, CREDS.ingest_password)
    a, b = device(broker, A), device(broker, B)
    try:
        assert not ingest.connect().is_failure
        assert ingest.subscribe("cw/v1/+/+") == [1]
        assert not b.connect().is_failure
        b.publish(f"cw/v1/{B}/status", b'{"battery": "SN-OF-B"}', retain=True)
        ingest.wait_for(f"cw/v1/{B}/status")
        assert not a.connect().is_failure
        assert a.subscribe(f"cw/v1/{A}/cmd") == [1]
        ingest.publish(f"cw/v1/{A}/cmd", b'{"cmd": 1}')
        a.wait_for(f"cw/v1/{A}/cmd")
        assert a.topics() == [f"cw/v1/{A}/cmd"]
    finally:
        for client in (ingest, a, b):
            client.close()


def test_devices_connecting_at_once_all_get_their_commands(tmp_path: Path) -> None:
    """amqtt 0.12.1 walks its subscription table across awaits (a connect replays retained
    messages for every filter in the broker; a broadcast asks the topic rules about each
    subscriber), so a client subscribing meanwhile raised "dictionary changed size during
    iteration" inside another client's connect: ``make demo`` logged hundreds of these as
    the district's devices connected, and the sessions they hit went deaf."""
    names = [f"D{i:03d}" for i in range(60)]
    creds = Credentials("ingest", "ingest-pw", {"P0": "p-pw", **{d: "pw" for d in names}})
    path = tmp_path / "credentials.json"
    path.write_text(creds.to_json())
    embedded = EmbeddedBroker("127.0.0.1", free_port(), credentials=path)
    asyncio.run(embedded.__aenter__())
    ingest = Client(embedded.port, "ingest", "ingest-pw")
    publisher = Client(embedded.port, "P0", "p-pw")
    devices = {d: Client(embedded.port, d, "pw") for d in names}

    def join(name: str) -> None:
        assert not devices[name].connect().is_failure
        assert devices[name].subscribe(f"cw/v1/{name}/cmd") == [1]

    try:
        assert not ingest.connect().is_failure
        assert ingest.subscribe("cw/v1/+/+") == [1]
        assert not publisher.connect().is_failure
        for i in range(20):  # what the broker replays on each connect
            publisher.publish("cw/v1/P0/status", str(i).encode(), retain=True)
        threads = [threading.Thread(target=join, args=(d,)) for d in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for name in names:
            ingest.publish(f"cw/v1/{name}/cmd", name.encode())
        for name, client in devices.items():
            client.wait_for(f"cw/v1/{name}/cmd")
            assert client.topics() == [f"cw/v1/{name}/cmd"]
    finally:
        for client in (ingest, publisher, *devices.values()):
            client.close()
        asyncio.run(embedded.__aexit__(None, None, None))
