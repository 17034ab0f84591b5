"""The history bench part: a short district run stores every message once, compacted."""

from __future__ import annotations

from pathlib import Path

from bench.historyday import district_day


def test_a_short_district_run_is_stored_whole_and_compacted(tmp_path: Path) -> None:
    got = district_day(tmp_path, devices=6, hours=2.5)
    assert got["devices"] == 6
    assert got["piles"] > 0, "piles of the district"
    assert got["cabinets"] > 0, "cabinets of the district"
    assert got["stored"] == got["messages"]
    # two hours were over: only the half hour still open is raw
    assert 0 < got["open_hour_statuses"] < got["statuses"] / 4
    # beats every 0.8-0.95 x 30 s, and statuses on change
    assert 24 * 3600 / 28.5 <= got["statuses_per_device_day"] <= 24 * 3600 / 20
    assert 0 < got["compacted_bytes"] < got["file_bytes"]
