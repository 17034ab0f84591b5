"""Trends learns how much energy a whole charging session takes, from ports that go from
``charging`` to ``finished``; until five are seen it says it assumes 1,000 Wh."""

from __future__ import annotations

from api.live import NOMINAL_SESSION_WH, Trends
from devices.catalog import Catalog
from devices.contract import PileStatus, Port, PortState
from ingest.twins import Twin


def status(ts: int, state: PortState, energy_wh: float) -> PileStatus:
    ports = [
        Port(n=1, state=state, energy_wh=energy_wh, power_w=200.0 if state == "charging" else 0)
    ]
    ports += [Port(n=n, state="available") for n in range(2, 11)]
    return PileStatus(v=1, ts=ts, boot="test", seq=ts, ports=ports)


def test_session_energy_is_learned_from_finished_sessions() -> None:
    twin = Twin.for_device(Catalog.load().devices["WGS-P01"])
    trends = Trends()
    assert trends.session_energy() == (
        NOMINAL_SESSION_WH,
        "assumed 1,000 Wh sessions (too few seen)",
    )
    ts = 1_000
    steps: list[tuple[PortState, float]]
    for energy in (600.0, 800.0, 700.0, 900.0, 1100.0):
        steps = [
            ("charging", energy / 2),
            ("charging", energy),
            ("finished", energy),
            ("available", 0.0),
        ]
        for state, wh in steps:
            ts += 1_000
            twin.status = status(ts, state, wh)
            trends.observe([twin])
    median, basis = trends.session_energy()
    assert median == 800.0
    assert basis == "median energy of 5 observed sessions"
    # a session cut short (charging -> available, the rider left early) is not a whole one
    steps = [("charging", 50.0), ("available", 0.0)]
    for state, wh in steps:
        ts += 1_000
        twin.status = status(ts, state, wh)
        trends.observe([twin])
    assert trends.session_energy()[1] == "median energy of 5 observed sessions"
