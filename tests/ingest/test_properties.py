"""Properties, with hypothesis, of the contract decoder and of the twins behind the
pipeline: any message, valid or not, is an answer (a model or a ContractError with a
known reason), leaves every other device's twin as it was, and leaves the pipeline
answering: every message acknowledged, and a valid message afterwards still applies.

Example counts are bounded for CI (a few seconds in all); the seed is fixed
(``derandomize``) so a failure in CI is the same failure on a laptop.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.contract import REASONS, ContractError, decode
from ingest.metrics import IngestMetrics
from ingest.pipeline import Pipeline, Twins
from tests.ingest.test_pipeline import (
    CABINET,
    CATALOG,
    PILE,
    SCHEME,
    FlakyStore,
    Rig,
    cabinet_birth,
    cabinet_status,
    header,
    pile_birth,
    pile_status,
)

SCALE = int(os.environ.get("CHARGEWATCH_HYPOTHESIS_SCALE", "1"))  # more: a deeper run
BOUNDED = settings(
    max_examples=60 * SCALE,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CHANNELS = ("status", "event", "state", "cmd")
FIELDS = (
    "v", "ts", "boot", "seq", "kind", "ports", "slots", "n", "state", "fault", "faults",
    "power_w", "energy_wh", "session", "battery", "soc", "temp_c", "online", "type", "code",
    "port", "slot", "heartbeat_s", "smoke", "slot_out", "battery_out", "soc_out",
)  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(
        ["available", "charging", "faulted", "pile", "cabinet", "2026-11-28T12:00:00Z"]
    )
)
keys = st.sampled_from(FIELDS) | st.text(max_size=6)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)
VALID = [
    pile_birth(),
    pile_status(1),
    cabinet_birth(),
    cabinet_status(1),
    {**header(2), "type": "session_started", "port": 1, "session": "s-1"},
    {"v": 1, "online": False, "boot": "boot-a", "seq": 3},
]


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A valid message with a few fields replaced, dropped or added."""
    data: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(VALID)))
    for key, value in draw(st.dictionaries(keys, json_values, max_size=3)).items():
        data[key] = value
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=2)):
        data.pop(key, None)
    units = data.get("ports") or data.get("slots")
    if isinstance(units, list) and units and isinstance(units[0], dict):
        units[0].update(draw(st.dictionaries(keys, json_values, max_size=2)))
    return json.dumps(data).encode()


payloads = (
    near_valid() | st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
)


@BOUNDED
@given(channel=st.sampled_from(CHANNELS), payload=payloads)
def test_decode_answers_a_model_or_a_contract_error(channel: str, payload: bytes) -> None:
    error: ContractError | None = None
    try:
        decode(channel, payload)  # type: ignore[arg-type]
    except ContractError as exc:
        error = exc
    if error is not None:
        assert error.reason in REASONS
        assert error.detail


@BOUNDED
@given(data=st.data())
def test_a_repeated_key_is_always_rejected(data: st.DataObject) -> None:
    """Any key of any object of a valid message, said twice with any value first."""
    message = copy.deepcopy(data.draw(st.sampled_from(VALID[:5])))
    objects = [message]
    units = message.get("ports") if isinstance(message.get("ports"), list) else message.get("slots")
    if isinstance(units, list):
        objects += units
    target = data.draw(st.sampled_from(objects))
    key = data.draw(st.sampled_from(sorted(target)))
    first = data.draw(scalars)
    marker = "__dup__"
    target[marker] = None
    text = json.dumps(message).replace(
        f'"{marker}": null', f'"{key}": {json.dumps(first)}, "{key}": {json.dumps(target[key])}'
    )
    channel = "status" if "kind" in message and "online" not in message else (
        "state" if "online" in message else "event"
    )  # fmt: skip
    with pytest.raises(ContractError) as info:
        decode(channel, text.encode())  # type: ignore[arg-type]
    assert info.value.reason == "duplicate_key", text


# -- the pipeline ----------------------------------------------------------------------------

OTHER_PILE = [d.id for d in CATALOG.devices.values() if d.kind == "pile"][1]
T1 = 1_796_284_900_000


def _rig(tmp: Path) -> Rig:
    log: list[tuple[str, int]] = []
    store = FlakyStore(tmp / "cw.db", log)
    holder: list[Rig] = []

    def ack(r: Any) -> bool:
        holder[0].acked.append(r)
        return True

    pipeline = Pipeline(
        catalog=CATALOG, scheme=SCHEME, twins=Twins(CATALOG), history=store, state=store,
        metrics=IngestMetrics(), ack=ack, retry_max_s=0.05,
    )  # fmt: skip
    holder.append(Rig(pipeline, store, pipeline.metrics, log))
    return holder[0]


def _snapshot(rig: Rig, device_id: str) -> dict[str, Any]:
    return copy.deepcopy(dataclasses.asdict(rig.twin(device_id)))


@settings(BOUNDED, max_examples=40 * SCALE)
@given(
    channel=st.sampled_from(CHANNELS),
    payload=payloads,
    retained=st.booleans(),
    at=st.integers(min_value=0, max_value=2**45),
)
def test_a_message_touches_only_its_own_device(
    channel: str, payload: bytes, retained: bool, at: int
) -> None:
    async def scenario(rig: Rig) -> None:
        await rig.feed(
            rig.received(PILE, "state", pile_birth()),
            rig.received(PILE, "status", pile_status(1)),
            rig.received(OTHER_PILE, "state", pile_birth()),
            rig.received(OTHER_PILE, "status", pile_status(1, state="charging")),
            rig.received(CABINET, "state", cabinet_birth()),
            rig.received(CABINET, "status", cabinet_status(1)),
        )
        before = {d: _snapshot(rig, d) for d in CATALOG.devices if d != PILE}
        acked = len(rig.acked)
        await rig.feed(rig.received(PILE, channel, payload, retained=retained, at=at))
        assert len(rig.acked) == acked + 1  # answered: acknowledged (stored or dead-lettered)
        for device_id, snapshot in before.items():
            assert _snapshot(rig, device_id) == snapshot, device_id
        # the pipeline still applies a valid message for that device (a new boot)
        fresh = "fresh-boot-after"
        await rig.feed(
            rig.received(PILE, "state", pile_birth(boot=fresh, ts=T1), at=T1),
            rig.received(
                PILE, "status", pile_status(1, state="charging", boot=fresh, ts=T1), at=T1
            ),
        )
        twin = rig.twin(PILE)
        assert twin.boot == fresh
        assert twin.status is not None
        assert {p.state for p in twin.status.units} == {"charging"}
        assert rig.pipeline.unacked == 0

    with tempfile.TemporaryDirectory() as tmp:
        rig = _rig(Path(tmp))
        try:
            asyncio.run(scenario(rig))
        finally:
            rig.store.close()
