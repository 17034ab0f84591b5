"""The benchmark regression check: the short bench (< 60 s) against a committed baseline.

Fails only on a large drop of a ratio (below half the baseline), never on absolute times:
the machines are shared, so msg/s moves with everything else that runs; a ratio to a
ceiling measured in the same run moves much less.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import suite
from tests.servers import need_binary

BASELINE = json.loads((Path(__file__).with_name("baseline.json")).read_text())
DROP = 0.5  # fail below half the baseline ratio

pytestmark = pytest.mark.e2e


def below(ratio: float, baseline: float) -> bool:
    return ratio < baseline * DROP


@pytest.mark.parametrize(
    ("ratio", "baseline", "fails"),
    [(0.25, 0.25, False), (0.13, 0.25, False), (0.12, 0.25, True), (0.0, 0.17, True)],
)
def test_only_a_large_drop_fails(ratio: float, baseline: float, fails: bool) -> None:
    assert below(ratio, baseline) is fails


def test_short_bench_ratios_hold(tmp_path: Path) -> None:
    """A drop must show twice: one short run on a shared machine can land at the line by
    noise alone (a CI run measured 0.064 against a line of 0.065, then 0.12 alone)."""
    need_binary("mosquitto", "/usr/sbin/mosquitto")
    need_binary("mosquitto_sub")
    plan = suite.Plan.short()
    drops: set[str] = set()
    for attempt in range(2):
        work = tmp_path / str(attempt)
        work.mkdir()
        began = time.monotonic()
        result = suite.throughput(work, plan)
        took = time.monotonic() - began
        for kind, runs in result["runs"].items():
            assert [r["count"] for r in runs] == [plan.messages] * plan.rounds, kind
        drops = {
            f"{kind} {versus}: {value:.3f} < {DROP} x {BASELINE[kind][versus]} (took {took:.0f} s)"
            for kind, ratios in result["ratios"].items()
            if kind in BASELINE
            for versus, value in ratios.items()
            if below(value, BASELINE[kind][versus])
        }
        if not drops:
            return
    assert not drops, f"throughput ratios fell in two runs: {sorted(drops)}"
