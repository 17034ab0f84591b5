"""The wire form, checked against the contract's own decoder; config parsing; backoff."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest

from devices.catalog import Catalog
from devices.contract import Birth, CabinetStatus, Death, Event, PileStatus, decode, parse_ts
from simulators import payloads
from simulators.backoff import Backoff
from simulators.cabinet import CabinetModel
from simulators.config import BrokerAddress, Shard
from simulators.daycycle import LOCAL_TZ
from simulators.errors import SimulatorError
from simulators.pile import PileModel
from simulators.rng import device_rng
from tests.simulators.conftest import START

T0 = START.timestamp()


def test_piles_stamp_rfc3339_at_plus_eight_cabinets_epoch_ms() -> None:
    at = T0 + 3600.25
    assert payloads.device_ts("pile", at) == "2026-11-28T12:00:00.250+08:00"
    assert payloads.device_ts("cabinet", at) == round(at * 1000)
    assert parse_ts(payloads.device_ts("pile", at)) == round(at * 1000)


def test_pile_stamps_match_a_datetime_per_message() -> None:
    """The per-second cache gives the text a datetime per message would (was: per message)."""
    rng = random.Random(5)
    for _ in range(2000):
        at = T0 + rng.uniform(-3 * 86400, 3 * 86400)
        exact = datetime.fromtimestamp(round(at * 1000) / 1000, tz=UTC).astimezone(LOCAL_TZ)
        assert payloads.device_ts("pile", at) == exact.isoformat(timespec="milliseconds")


def test_message_is_the_header_then_the_body() -> None:
    body = {"kind": "pile", "temp_c": 31.5, "note": "中文", "faults": []}
    text = payloads.message("pile", T0 + 0.5, "7f3a", 42, body)
    ts = payloads.device_ts("pile", T0 + 0.5)
    header = {"v": 1, "ts": ts, "boot": "7f3a", "seq": 42}
    assert json.loads(text) == {**header, **body}
    assert list(json.loads(text)) == [*header, *body]
    assert text == json.dumps({**header, **body}, separators=(",", ":"), ensure_ascii=False)


def test_every_payload_decodes_with_the_contract(catalog: Catalog) -> None:
    pile_spec = next(d.spec for d in catalog.devices.values() if d.kind == "pile")
    cab_spec = next(d.spec for d in catalog.devices.values() if d.kind == "cabinet")
    pile = PileModel(pile_spec, device_rng(1, pile_spec.id), T0)
    cabinet = CabinetModel(cab_spec, device_rng(1, cab_spec.id), T0)
    pile.inject_fault("comm_error", None, T0)
    cabinet.inject_fault("lock_failure", 4, T0)
    cabinet.set_smoke(True, T0)
    for model in (pile, cabinet):
        model.advance_to(T0 + 6 * 3600)
        seq = 0
        birth = payloads.message(
            model.kind, T0, "b00t", seq, payloads.birth_body(model.birth_fields(), 30)
        )
        decoded = decode("state", birth.encode())
        assert isinstance(decoded, Birth)
        assert decoded.units == model.units
        assert decoded.heartbeat_s == 30
        assert decoded.seq == 0
        status = decode(
            "status", payloads.message(model.kind, T0, "b00t", 1, model.snapshot()).encode()
        )
        assert isinstance(status, PileStatus | CabinetStatus)
        assert len(status.units) == model.units
        events = model.drain().events
        assert {e.body["type"] for e in events} >= {"fault_raised"}
        for i, event in enumerate(events, start=2):
            text = payloads.message(model.kind, event.at, "b00t", i, event.body)
            decoded_event = decode("event", text.encode())
            assert isinstance(decoded_event, Event)
            assert decoded_event.seq == i
    cab_status = decode(
        "status", payloads.message("cabinet", T0, "b00t", 9, cabinet.snapshot()).encode()
    )
    assert isinstance(cab_status, CabinetStatus)
    assert "smoke" in cab_status.device_faults
    assert cab_status.slots[3].state == "faulted"
    assert cab_status.slots[3].fault == "lock_failure"
    death = decode("state", payloads.death("b00t", 3).encode())
    assert death == Death(v=1, online=False, boot="b00t", seq=3)


def test_broker_address_and_shard_parsing() -> None:
    assert BrokerAddress.parse("mqtt://127.0.0.1:1884") == BrokerAddress("127.0.0.1", 1884)
    assert BrokerAddress.parse("mqtt://broker") == BrokerAddress("broker", 1883)
    assert BrokerAddress.parse("mqtts://broker") == BrokerAddress("broker", 8883, tls=True)
    with pytest.raises(SimulatorError, match="mqtt://host:port"):
        BrokerAddress.parse("ws://broker:8883")
    shard = Shard.parse("2/3")
    assert [p for p in range(9) if shard.takes(p)] == [1, 4, 7]
    for bad in ("0/3", "4/3", "x", "1/0"):
        with pytest.raises(SimulatorError):
            Shard.parse(bad)


def test_backoff_grows_jittered_and_capped() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 4, 4, 4, 4]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    backoff.reset()
    assert backoff.next_delay() <= 0.5
