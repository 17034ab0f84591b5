"""The broker's rules and files without a broker: mosquitto's password hash (cross-checked
with the real mosquitto_passwd), the credentials file, the topic rules, the generator's
rotation and file modes, and broker URLs that never show a password."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ingest import BrokerConfigError
from ingest.brokerauth import (
    Credentials,
    CredentialsError,
    TopicRules,
    filter_within,
    mosquitto_hash,
    verify_mosquitto_hash,
)
from ingest.brokerconfig import MosquittoOptions, generate, queued_messages
from ingest.mqtt import BrokerURL
from tests.servers import need_binary


def test_our_hash_check_agrees_with_mosquitto_passwd(tmp_path: Path) -> None:
    binary = need_binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
    path = tmp_path / "passwd"
    subprocess.run([binary, "-b", "-c", str(path), "dev", "s3cret:é"], check=True, timeout=10)
    hashed = path.read_text().strip().split(":", 1)[1]
    assert hashed.startswith("$7$101$")
    assert verify_mosquitto_hash("s3cret:é", hashed)
    assert not verify_mosquitto_hash("s3cret:e", hashed)


def test_our_hash_has_mosquittos_shape_and_verifies() -> None:
    hashed = mosquitto_hash("pw", salt=b"\x00" * 12)
    kind, iterations, salt, digest = hashed.split("$")[1:]
    assert (kind, iterations, salt) == ("7", "101", "AAAAAAAAAAAAAAAA")
    assert len(digest) == 88  # base64 of 64 bytes
    assert verify_mosquitto_hash("pw", hashed)
    assert not verify_mosquitto_hash("pW", hashed)
    assert mosquitto_hash("pw") != mosquitto_hash("pw")  # a new salt each time
    for broken in ("", "$6$abc$def", "$7$x$AA$AA", "$7$101$!!$AA", "$7$0$AA$AA"):
        assert not verify_mosquitto_hash("pw", broken)


@pytest.mark.parametrize(
    ("requested", "allowed", "within"),
    [
        ("cw/v1/A/status", "cw/v1/A/#", True),
        ("cw/v1/A", "cw/v1/A/#", True),  # MQTT: a/# matches a too, as in mosquitto
        ("cw/v1/A/x/y", "cw/v1/A/#", True),
        ("cw/v1/B/status", "cw/v1/A/#", False),
        ("cw/v1/+/status", "cw/v1/A/#", False),
        ("cw/v1/#", "cw/v1/A/#", False),
        ("cw/v1/A/#", "cw/v1/A/#", True),
        ("cw/v1/A/cmd", "cw/v1/+/cmd", True),
        ("cw/v1/+/cmd", "cw/v1/+/cmd", True),
        ("cw/v1/#", "cw/v1/+/cmd", False),
        ("cw/v1/A/cmd/x", "cw/v1/+/cmd", False),
        ("cw/v1/A/status", "cw/v1/+/cmd", False),
        ("#", "cw/v1/#", False),
        ("+/v1/A/cmd", "cw/v1/A/cmd", False),
    ],
)
def test_filter_within(requested: str, allowed: str, within: bool) -> None:
    assert filter_within(requested, allowed) is within


def test_topic_rules() -> None:
    rules = TopicRules("cw/v1", "chargewatch-ingest")
    assert rules.may_publish("A", "cw/v1/A/status")
    assert rules.may_publish("A", "cw/v1/A/state")
    assert not rules.may_publish("A", "cw/v1/B/state")
    assert not rules.may_publish("A", "other/A/state")
    assert not rules.may_publish(None, "cw/v1/A/state")
    assert not rules.may_publish("A/B", "cw/v1/A/B/state")  # never a pattern for such a name
    assert rules.may_subscribe("A", "cw/v1/A/cmd")
    assert not rules.may_subscribe("A", "cw/v1/B/cmd")
    assert not rules.may_subscribe("A", "cw/v1/+/cmd")
    assert not rules.may_subscribe("A", "cw/v1/A/status")
    assert not rules.may_subscribe("A", "#")
    assert rules.may_subscribe("chargewatch-ingest", "cw/v1/+/+")
    assert rules.may_subscribe("chargewatch-ingest", "cw/v1/A/status")  # a delivery
    assert not rules.may_subscribe("chargewatch-ingest", "#")
    assert rules.may_publish("chargewatch-ingest", "cw/v1/A/cmd")
    assert not rules.may_publish("chargewatch-ingest", "cw/v1/A/status")
    acl = rules.acl_text()
    assert "pattern write cw/v1/%u/#" in acl
    assert "pattern read cw/v1/%u/cmd" in acl
    assert "user chargewatch-ingest\ntopic read cw/v1/#\ntopic write cw/v1/+/cmd" in acl


def test_credentials_file() -> None:
    creds = Credentials("ingest", "pw0", {"A": "pw1", "B": "pw2"})
    again = Credentials.from_json(creds.to_json())
    assert again == creds
    assert again.check("A", "pw1")
    assert not again.check("A", "pw2")
    assert not again.check("B", None)
    assert not again.check(None, "pw1")
    assert again.check("ingest", "pw0")
    assert "pw" not in repr(again)
    with pytest.raises(CredentialsError, match="also a device id"):
        Credentials("A", "x", {"A": "y"})
    for text, says in [
        ("[]", "expected"),
        ('{"ingest": {"username": "i", "password": "p"}, "devices": {"a/b": "x"}}', "a/b"),
        ('{"ingest": {"username": "i", "password": "p"}, "devices": {"A": ""}}', "no password"),
        ("{", "not JSON"),
    ]:
        with pytest.raises(CredentialsError, match=says):
            Credentials.from_json(text, "f.json")


def _options(**kw: object) -> MosquittoOptions:
    return MosquittoOptions(user=os.environ.get("USER") or _me(), **kw)  # type: ignore[arg-type]


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def test_generate_keeps_passwords_rotates_one_and_drops_removed(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    generate(out, ["A", "B", "C"], _options())
    first = Credentials.load(out / "credentials.json")
    written = generate(out, ["A", "B", "D"], _options(), rotate=["A"])
    second = Credentials.load(out / "credentials.json")
    assert (written.rotated, written.added, written.removed) == (["A"], ["D"], ["C"])
    assert second.devices["A"] != first.devices["A"]
    assert second.devices["B"] == first.devices["B"]
    assert set(second.devices) == {"A", "B", "D"}
    assert second.ingest_password == first.ingest_password
    hashes = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    assert set(hashes) == {"chargewatch-ingest", "A", "B", "D"}
    assert verify_mosquitto_hash(second.devices["A"], hashes["A"])
    assert not verify_mosquitto_hash(first.devices["A"], hashes["A"])
    assert verify_mosquitto_hash(second.ingest_password, hashes["chargewatch-ingest"])
    assert os.stat(out).st_mode & 0o777 == 0o700
    for name in ("credentials.json", "passwd", "acl", "mosquitto.conf"):
        assert os.stat(out / name).st_mode & 0o777 == 0o600, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    data = json.loads((out / "credentials.json").read_text())
    assert set(data) == {"ingest", "devices"}
    assert set(data["ingest"]) == {"username", "password"}


def test_generate_refuses_what_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(BrokerConfigError, match=r"--rotate: .*NOPE"):
        generate(tmp_path / "a", ["A"], _options(), rotate=["NOPE"])
    with pytest.raises(BrokerConfigError, match="no such account"):
        generate(tmp_path / "b", ["A"], MosquittoOptions(user="no-such-account-here"))
    with pytest.raises(BrokerConfigError, match="also a device id"):
        generate(tmp_path / "c", ["chargewatch-ingest"], _options())
    with pytest.raises(BrokerConfigError, match="--tls-port"):
        MosquittoOptions(tls=True, port=1883, tls_port=1883)


def test_conf_sizes_the_queue_for_the_outage(tmp_path: Path) -> None:
    written = generate(tmp_path / "b", [f"D{i}" for i in range(2000)], _options(outage_hours=24))
    assert written.queued_messages == queued_messages(2000, 24) == 2000 * 150 * 24
    conf = (tmp_path / "b/mosquitto.conf").read_text()
    assert f"max_queued_messages {2000 * 150 * 24}\n" in conf
    assert "allow_anonymous false\n" in conf
    assert conf.count("use_username_as_clientid true") == 1  # one listener without --tls
    assert queued_messages(3, 1) == 100_000  # never below mosquitto-scale defaults


def test_broker_url_takes_credentials_and_never_shows_the_password(tmp_path: Path) -> None:
    url = BrokerURL.parse("mqtt://ingest:p%40ss%3Aw0rd@broker.example:1884")
    assert (url.username, url.password, url.host, url.port, url.tls) == (
        "ingest",
        "p@ss:w0rd",
        "broker.example",
        1884,
        False,
    )
    secure = BrokerURL.parse("mqtts://i:secret@h")
    assert (secure.port, secure.tls) == (8883, True)
    for shown in (str(url), repr(url), str(secure), repr(secure)):
        assert "p@ss" not in shown
        assert "p%40ss" not in shown
        assert "secret" not in shown
    with pytest.raises(BrokerConfigError) as refused:
        BrokerURL.parse("http://i:secret@h:1883")
    assert "secret" not in str(refused.value)
    assert "i:***@h:1883" in str(refused.value)
    with pytest.raises(BrokerConfigError) as bad_port:
        BrokerURL.parse("mqtt://i:secret@h:99999")
    assert "secret" not in str(bad_port.value)
    with pytest.raises(BrokerConfigError, match="mqtts://"):
        BrokerURL.parse("mqtt://h", cafile=tmp_path)
    with pytest.raises(BrokerConfigError, match="does not exist"):
        BrokerURL.parse("mqtts://h", cafile=tmp_path / "nope.crt")
