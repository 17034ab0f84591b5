"""The cluster part of ``chargewatch bench`` in its short variant (< 60 s), so it cannot rot:
real mosquitto, PostgreSQL, ``chargewatch serve``, two ``chargewatch ingest`` workers and a
``chargewatch api`` replica. It checks that every figure is measured, not that the targets
are met (the machines are shared: docs/benchmarks.md has the figures of a full run)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import cluster, suite
from tests.pg_server import pg_bin
from tests.servers import need_binary

pytestmark = pytest.mark.e2e


def test_sizing_is_the_arithmetic_of_cpu_per_message() -> None:
    # 100 us a message: 10,000 msg/s on a core; the district sends 13 msg/s of 412 devices
    s = cluster.sizing(100.0)
    assert s["msg_s_per_core"] == pytest.approx(10_000)
    assert s["devices_per_core"] == pytest.approx(10_000 * 412 / 13)


def test_summary_ratios_and_targets() -> None:
    def run(cpu: float, pg: float | None = None) -> dict[str, float]:
        return {"cpu_us_per_msg": cpu} | ({} if pg is None else {"pg_cpu_us_per_msg": pg})

    drain = {
        "embedded": [run(60), run(70)],
        "1 worker": [run(100, 10), run(120, 10)],
        "2 workers": [run(120, 12), run(140, 12)],
    }
    live = {
        "embedded": [run(80)],
        "1 worker": [run(150, 20)],
        "2 workers": [run(210, 30)],
    }
    api = {"p99_ms": 25.0, "errors": 0}
    # the headline is the drain's whatever the order of the modes
    s = cluster.summarize({"live": live, "drain": drain}, api, 400, {})
    assert s["scale_overhead"] == pytest.approx(130 / 110)  # medians
    assert s["pg_share"] == pytest.approx(65 / 110)
    assert s["pg_share_with_db"] == pytest.approx(65 / 120)
    assert s["added_core_msg_s"] == pytest.approx(1e6 / 130)
    assert s["sizing"]["worker + its PostgreSQL CPU"] == cluster.sizing(142)
    assert s["targets_met"] == {"scale_overhead": False, "pg_share": True, "replica_p99": False}
    assert s["modes"]["live"]["scale_overhead"] == pytest.approx(210 / 150)
    assert s["modes"]["live"]["pg_cpu_us_per_msg"] == {"1 worker": 20, "2 workers": 30}


def test_render_shows_every_mode() -> None:
    def run(cpu: float, pg: float | None = None) -> dict[str, float]:
        one = {"cpu_us_per_msg": cpu, "msgs_per_batch": 300.0, "rate": 5000.0, "loadavg_1m": 1.0}
        return one | ({} if pg is None else {"pg_cpu_us_per_msg": pg})

    runs = {
        mode: {"embedded": [run(60)], "1 worker": [run(100, 9)], "2 workers": [run(k, 11)]}
        for mode, k in (("drain", 110), ("serial", 104), ("live", 150))
    }
    api = {
        "p99_ms": 5.0, "errors": 0, "stations": 3, "answer_bytes": 100, "offered_rps": 500,
        "ingest_rate_during": 130, "p50_ms": 1.0, "max_ms": 9.0, "achieved_rps": 500,
        "server_cpu_us_per_request": 800, "loadavg_1m": 1.0,
    }  # fmt: skip
    summary = cluster.summarize(runs, api, 400, {"pile": 844.0})
    summary["idle_seconds"] = 10.0
    summary["idle"] = {
        "1 worker": {"cpu_ms_per_s": 8.04, "pg_cpu_ms_per_s": 0.5},
        "2 workers": {"cpu_ms_per_s": 21.0, "pg_cpu_ms_per_s": 1.0},
    }
    text = "\n".join(cluster.render(summary))
    assert "| 2 workers | serial | 104 | 11 | 300 |" in text
    assert "| 2 workers | live | 150 | 11 | 300 |" in text
    assert "2 workers / 1 worker = **1.10x**" in text
    assert "drain: 1.10x; serial: 1.04x; live: 1.50x" in text
    assert "1 worker (all 16 partitions) 8.0 ms of CPU a second, 2 workers 21.0 ms" in text


def test_short_cluster_part_measures_every_figure(tmp_path: Path) -> None:
    need_binary("mosquitto", "/usr/sbin/mosquitto")
    pg_bin("postgres")  # skips on a laptop without PostgreSQL, fails under CI
    plan = suite.Plan.cluster_short()
    began = time.monotonic()
    result = cluster.cluster(tmp_path, plan)
    assert time.monotonic() - began < 90
    assert result is not None
    assert set(result["runs"]) == set(plan.cluster_modes)
    for mode, by_name in result["runs"].items():
        for name, runs in by_name.items():
            assert [r["messages"] for r in runs] == [plan.cluster_messages], (mode, name)
            assert all(r["cpu_us_per_msg"] > 0 for r in runs), (mode, name)
            assert all(r["msgs_per_batch"] >= 1 for r in runs), (mode, name)
        assert set(result["modes"][mode]["pg_cpu_us_per_msg"]) == {"1 worker", "2 workers"}
    replica = result["replica"]
    assert replica["errors"] == 0
    assert replica["statuses"] == {"200": replica["requests"]}
    assert replica["requests"] >= 0.9 * cluster.RIDER_RPS * plan.cluster_api_seconds
    assert replica["stations"] > 0
    assert replica["ingest_rate_during"] > 0  # the workers ingested while it answered
    assert set(result["idle"]) == {"1 worker", "2 workers"}
    assert all(v["cpu_ms_per_s"] >= 0 for v in result["idle"].values())
