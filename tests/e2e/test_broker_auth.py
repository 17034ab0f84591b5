"""Devices authenticated by a real mosquitto started with the files that
``chargewatch broker-config mosquitto`` generated from a catalog (as root, mosquitto drops to
the ``mosquitto`` account that the generator gave the files to, as in a deployment).

Proves: anonymous, wrong and borrowed passwords are refused; a device publishing as another
(a message or its Will) never reaches the ingest user's subscription nor a running
``chargewatch serve``; nor can it take over another's connection with its client id; a
device reading another's commands gets nothing; TLS works with the generated CA and fails
with another; a rotated password works after SIGHUP and the old one no longer does; and
``serve`` + ``simulate`` run over TLS with these credentials."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from api.auth import KeyStore
from ingest import brokertls
from ingest.brokerauth import Credentials
from tests.mqttclients import Client
from tests.servers import (
    Process,
    Service,
    broker_config_dir,
    chargewatch_argv,
    chargewatch_serve,
    eventually,
    free_port,
    mosquitto_from,
    need_binary,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
A, B = "WGS-P01", "WGS-C01"  # two devices of the small catalog


def small_catalog(path: Path) -> Path:
    """The district's first station with one pile (A) and one cabinet (B)."""
    data = json.loads((REPO / "devices/data/district.json").read_text())
    station = data["stations"][0]
    station["devices"] = [d for d in station["devices"] if d["id"] in (A, B)]
    data["stations"] = [station]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def broker_config(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        chargewatch_argv("broker-config", "mosquitto", "--out", str(out), *args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


@dataclass
class Deployment:
    dir: Path
    catalog: Path
    port: int
    tls_port: int
    broker: Process
    ingest_port: int

    @property
    def creds(self) -> Credentials:
        return Credentials.load(self.dir / "credentials.json")

    def device(self, device_id: str, password: str | None = None, **kw: object) -> Client:
        secret = self.creds.devices[device_id] if password is None else password
        return Client(self.port, device_id, secret, **kw)  # type: ignore[arg-type]

    def ingest(self) -> Client:
        c = self.creds
        return Client(self.port, c.ingest_username, c.ingest_password)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    need_binary("mosquitto", "/usr/sbin/mosquitto")
    out = broker_config_dir()
    port, tls_port, ingest_port = free_port(), free_port(), free_port()
    catalog = small_catalog(tmp_path / "catalog.json")
    try:
        generated = broker_config(
            out,
            "--catalog", str(catalog),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--tls",
            "--tls-port", str(tls_port),
            "--ingest-port", str(ingest_port),
        )  # fmt: skip
        creds = Credentials.load(out / "credentials.json")
        for secret in (creds.ingest_password, *creds.devices.values()):
            assert secret not in generated.stdout + generated.stderr
        with mosquitto_from(out, port, tmp_path / "log") as broker:
            yield Deployment(out, catalog, port, tls_port, broker, ingest_port)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_files_are_private_and_owned_by_the_broker_account(deployment: Deployment) -> None:
    mode = {p.name: p.stat().st_mode & 0o777 for p in deployment.dir.iterdir()}
    assert os.stat(deployment.dir).st_mode & 0o777 == 0o700
    assert mode["credentials.json"] == mode["passwd"] == mode["server.key"] == 0o600
    assert mode["ca.key"] == 0o600
    creds = deployment.creds
    assert set(creds.devices) == {A, B}
    assert len({creds.ingest_password, *creds.devices.values()}) == 3  # all different
    if os.geteuid() == 0:
        import pwd

        broker_uid = pwd.getpwnam("mosquitto").pw_uid
        assert (deployment.dir / "passwd").stat().st_uid == broker_uid
        assert (deployment.dir / "credentials.json").stat().st_uid == 0  # not the broker's


def test_anonymous_and_wrong_passwords_are_refused(deployment: Deployment) -> None:
    creds = deployment.creds
    refused = {
        "anonymous": Client(deployment.port),
        "wrong password": deployment.device(A, "not-the-password"),
        "B's password for A": deployment.device(A, creds.devices[B]),
        "unknown user": Client(deployment.port, "NOPE-01", creds.devices[A]),
        "anonymous on TLS": Client(
            deployment.tls_port, cafile=deployment.dir / "ca.crt", host="localhost"
        ),
    }
    for what, client in refused.items():
        try:
            assert client.connect().is_failure, what
        finally:
            client.close()
    accepted = deployment.device(A)  # the control: the same broker lets the right one in
    try:
        assert not accepted.connect().is_failure
    finally:
        accepted.close()


def test_ingest_workers_choose_their_client_ids_on_their_own_listener(
    deployment: Deployment,
) -> None:
    """Partitioned ingest (``chargewatch ingest``) runs one persistent session per partition,
    each with its own client id, all as the ingest user. The device listener makes every
    client id the username (so a device cannot take over another's session): two partition
    sessions there would throw each other out. The ingest listener lets them choose, and
    lets no device in."""
    c = deployment.creds
    workers = [
        Client(
            deployment.ingest_port, c.ingest_username, c.ingest_password, client_id=f"cw-p{p:02d}"
        )
        for p in range(2)
    ]
    device = deployment.device(A)
    intruders = [
        Client(deployment.ingest_port, A, c.devices[A]),
        Client(deployment.ingest_port, A, c.devices[A], client_id=B),
        Client(deployment.ingest_port),
    ]
    try:
        for worker in workers:
            assert not worker.connect().is_failure
            assert worker.subscribe(f"cw/v1/{A}/+") == [1]
        for intruder in intruders:
            assert intruder.connect().is_failure
        assert not device.connect().is_failure
        device.publish(f"cw/v1/{A}/status", b"{}")
        for worker in workers:  # both still connected: neither took the other's session
            worker.wait_for(f"cw/v1/{A}/status")
            assert worker.connected
    finally:
        for client in (*workers, device, *intruders):
            client.close()


def test_a_device_publishing_as_another_never_reaches_the_service(
    deployment: Deployment,
) -> None:
    ingest = deployment.ingest()
    b = deployment.device(B)
    clients = [ingest, b]
    try:
        assert not ingest.connect().is_failure
        assert ingest.subscribe("cw/v1/#") == [1]
        assert not b.connect().is_failure
        # A publishes on B's topics, then on its own: the broker keeps A's order, so once
        # A's own message arrived, B's would have too
        a = deployment.device(A)
        clients.append(a)
        assert not a.connect().is_failure
        for channel in ("state", "status", "event", "cmd"):
            a.publish(f"cw/v1/{B}/{channel}", b'{"spoofed": true}')
        a.publish(f"cw/v1/{A}/status", b'{"own": true}')
        ingest.wait_for(f"cw/v1/{A}/status")
        # A's Will on B's topic: the broker refuses the CONNECT or drops the Will
        liar = deployment.device(A, will=(f"cw/v1/{B}/state", b'{"spoofed will": true}'))
        clients.append(liar)
        if not liar.connect().is_failure:
            liar.vanish()
        # then a Will on its own topic, which does arrive: the barrier for the one above
        honest = deployment.device(A, will=(f"cw/v1/{A}/state", b'{"own will": true}'))
        clients.append(honest)
        assert not honest.connect().is_failure
        honest.vanish()
        ingest.wait_for(f"cw/v1/{A}/state")
        # A cannot take B's connection over by using B's client id either
        thief = deployment.device(A, client_id=B)
        clients.append(thief)
        assert not thief.connect().is_failure
        b.publish(f"cw/v1/{B}/status", b'{"still": "here"}')
        ingest.wait_for(f"cw/v1/{B}/status")
        assert b.connected
        from_b = [m for m in ingest.messages if m.topic.startswith(f"cw/v1/{B}/")]
        assert from_b == [type(from_b[0])(f"cw/v1/{B}/status", b'{"still": "here"}')]
    finally:
        for client in clients:
            client.close()


def test_a_device_reads_only_its_own_commands(deployment: Deployment) -> None:
    ingest, a, b = deployment.ingest(), deployment.device(A), deployment.device(B)
    try:
        for client in (ingest, a, b):
            assert not client.connect().is_failure
        a.subscribe(f"cw/v1/{B}/cmd", "cw/v1/+/cmd", "cw/v1/#", "#")
        assert b.subscribe(f"cw/v1/{B}/cmd") == [1]
        ingest.publish(f"cw/v1/{B}/cmd", b'{"cmd": "for B"}')
        ingest.publish(f"cw/v1/{A}/cmd", b'{"cmd": "for A"}')
        b.wait_for(f"cw/v1/{B}/cmd")  # the control: B gets its own
        a.wait_for(f"cw/v1/{A}/cmd")  # sent after B's: had A been given B's, it is here
        assert f"cw/v1/{B}/cmd" not in a.topics()
        # nor can a device send another a command
        a.publish(f"cw/v1/{B}/cmd", b'{"cmd": "from A"}')
        ingest.publish(f"cw/v1/{B}/cmd", b'{"cmd": "barrier"}')
        eventually(lambda: _assert_count(b, f"cw/v1/{B}/cmd", 2))
        assert b'{"cmd": "from A"}' not in [m.payload for m in b.messages]
    finally:
        for client in (ingest, a, b):
            client.close()


def _assert_count(client: Client, topic: str, n: int) -> None:
    assert client.topics().count(topic) == n, client.topics()


def test_tls_with_the_generated_ca_and_not_with_another(
    deployment: Deployment, tmp_path: Path
) -> None:
    for host in ("localhost", "127.0.0.1"):
        good = Client(
            deployment.tls_port, A, deployment.creds.devices[A],
            cafile=deployment.dir / "ca.crt", host=host,
        )  # fmt: skip
        try:
            assert not good.connect().is_failure, host
            good.publish(f"cw/v1/{A}/status", b"{}")
        finally:
            good.close()
    other = tmp_path / "other-ca.crt"
    other.write_bytes(brokertls.make_ca("someone else").cert)
    # the handshake a client makes (paho leaks the socket of a failed one)
    context = ssl.create_default_context(cafile=str(other))
    with (
        socket.create_connection(("127.0.0.1", deployment.tls_port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="localhost").close()


def test_a_rotated_password_works_after_sighup_and_the_old_one_does_not(
    deployment: Deployment,
) -> None:
    before = deployment.creds
    ca_before = (deployment.dir / "ca.crt").read_bytes()
    result = broker_config(
        deployment.dir,
        "--catalog", str(deployment.catalog),
        "--port", str(deployment.port),
        "--bind", "127.0.0.1",
        "--tls",
        "--tls-port", str(deployment.tls_port),
        "--rotate", A,
    )  # fmt: skip
    assert f"1 rotated ({A})" in result.stdout
    after = deployment.creds
    assert after.devices[A] != before.devices[A]
    assert after.devices[B] == before.devices[B]  # the others keep theirs
    assert after.ingest_password == before.ingest_password
    assert (deployment.dir / "ca.crt").read_bytes() == ca_before  # devices keep trusting it
    assert deployment.broker.proc is not None
    deployment.broker.proc.send_signal(signal.SIGHUP)

    def reloaded() -> None:
        new = deployment.device(A, after.devices[A])
        try:
            assert not new.connect().is_failure
        finally:
            new.close()

    eventually(reloaded, timeout=10)
    for who, password, refused in ((A, before.devices[A], True), (B, after.devices[B], False)):
        client = deployment.device(who, password)
        try:
            assert client.connect().is_failure is refused, who
        finally:
            client.close()
    assert deployment.broker.proc.poll() is None  # reloaded, not restarted


def test_mosquitto_started_as_its_own_account(deployment: Deployment, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to start mosquitto as another account")
    deployment.broker.stop()
    with mosquitto_from(deployment.dir, deployment.port, tmp_path / "log2", user="mosquitto"):
        client = deployment.device(A)
        try:
            assert not client.connect().is_failure
        finally:
            client.close()


def _online(service: Service) -> float:
    for line in service.get("/metrics").text.splitlines():
        if line.startswith("chargewatch_devices_online "):
            return float(line.split()[1])
    raise AssertionError("no chargewatch_devices_online")


@pytest.mark.parametrize("client", ["gmqtt", "paho"])
def test_service_and_simulator_over_tls_with_credentials(
    deployment: Deployment, tmp_path: Path, client: str
) -> None:
    creds = deployment.creds
    url = f"mqtts://{creds.ingest_username}:{creds.ingest_password}@localhost:{deployment.tls_port}"
    with chargewatch_serve(
        tmp_path / "serve", url, "--catalog", str(deployment.catalog),
        "--cafile", str(deployment.dir / "ca.crt"),
        env={"CHARGEWATCH_INGEST__MQTT_CLIENT": client},
    ) as service:  # fmt: skip
        argv = chargewatch_argv(
            "simulate", "--broker", f"mqtts://localhost:{deployment.tls_port}",
            "--catalog", str(deployment.catalog), "--speed", "60",
            "--credentials", str(deployment.dir / "credentials.json"),
            "--cafile", str(deployment.dir / "ca.crt"),
        )  # fmt: skip
        sim_log = tmp_path / "sim.log"
        with open(sim_log, "wb") as err:
            sim = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        try:

            def both_online() -> None:
                assert _online(service) == 2, sim_log.read_text()[-2000:]

            eventually(both_online, timeout=30)
            # a command through the ACL: the ingest user writes A's cmd, only A reads it
            _, token = KeyStore.in_dir(service.data_dir).create("ops", "maintainer")
            auth = {"Authorization": f"Bearer {token}"}
            asked = httpx.post(
                f"{service.base_url}/v1/devices/{A}/commands",
                json={"type": "disable_port", "port": 1}, headers=auth, timeout=10,
            )  # fmt: skip
            assert asked.status_code == 202, asked.text

            def done() -> None:
                got = service.get(f"/v1/commands/{asked.json()['id']}")
                got = httpx.get(got.url, headers=auth, timeout=10)
                assert got.json()["state"] in ("done", "rejected"), got.text  # port 1 in use?

            eventually(done, timeout=15)
        finally:
            sim.terminate()
            sim.wait(20)
        log = (tmp_path / "serve" / "serve.log").read_text() + sim_log.read_text()
        for secret in (creds.ingest_password, *creds.devices.values()):
            assert secret not in log


def _metrics(service: Service) -> dict[str, float]:
    values = {}
    for line in service.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_spoofed_messages_and_wills_never_reach_the_running_service(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The same as above, seen by a real ``chargewatch serve`` logged in as the ingest user:
    it receives A's own birth and death and nothing of what A said as B."""
    creds = deployment.creds
    url = f"mqtt://{creds.ingest_username}:{creds.ingest_password}@127.0.0.1:{deployment.port}"
    now = int(time.time() * 1000)

    def birth(device_id: str, kind: str) -> bytes:
        units = {"ports": 10} if kind == "pile" else {"slots": 12}
        return json.dumps(
            {"v": 1, "ts": now, "boot": "boot1", "seq": 0, "online": True, "kind": kind, **units}
        ).encode()

    death = json.dumps({"v": 1, "online": False, "boot": "boot1", "seq": 0}).encode()
    with chargewatch_serve(
        tmp_path / "serve", url, "--catalog", str(deployment.catalog)
    ) as service:
        a = deployment.device(A)
        clients = [a]
        try:
            assert not a.connect().is_failure
            a.publish(f"cw/v1/{B}/state", birth(B, "cabinet"))  # as B: dropped by the broker
            a.publish(f"cw/v1/{A}/state", birth(A, "pile"))
            liar = deployment.device(A, will=(f"cw/v1/{B}/state", death))
            clients.append(liar)
            if not liar.connect().is_failure:
                liar.vanish()
            honest = deployment.device(A, will=(f"cw/v1/{A}/state", death))
            clients.append(honest)
            assert not honest.connect().is_failure
            honest.vanish()

            def only_as_itself() -> None:
                values = _metrics(service)
                # A's birth, then its death (the barrier); B's would have come before each
                assert values["chargewatch_messages_received_total"] == 2, values
                assert values["chargewatch_devices_online"] == 0, values

            eventually(only_as_itself, timeout=15)
        finally:
            for client in clients:
                client.close()
