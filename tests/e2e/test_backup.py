"""`chargewatch backup` while ingest runs, `chargewatch restore` after: real mosquitto, a real
`chargewatch serve` process, a publisher streaming statuses, the commands as processes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ingest import StoreError
from ingest.influx import InfluxHistory
from tests.e2e.test_influx import district_rows
from tests.e2e.test_ingest_faults import DEVICES, Key, Stream, stored_keys
from tests.influx_servers import influxd
from tests.servers import chargewatch_argv, chargewatch_serve, eventually, mosquitto, need_binary

pytestmark = pytest.mark.e2e


def chargewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        chargewatch_argv(*args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )


def _at_least(data: Path, count: int) -> set[Key]:
    keys = set(stored_keys(data))
    assert len(keys) >= count
    return keys


def test_a_backup_mid_stream_restores_every_message_acknowledged_before_it(
    tmp_path: Path,
) -> None:
    data, restored = tmp_path / "data", tmp_path / "restored"
    out = tmp_path / "backups" / "cw.bak"
    out.parent.mkdir()
    with mosquitto(tmp_path / "mosquitto") as broker:
        stream = Stream(broker.port, rate=400)
        with chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data) as service:
            stream.start(count=4000)
            # serve acknowledges a message only once its batch is committed: what a reader
            # sees committed now includes everything it had acknowledged
            before = eventually(lambda: _at_least(data, 600), timeout=20)
            taken = chargewatch("backup", "--data-dir", str(data), "--out", str(out))
            assert taken.returncode == 0, taken.stderr
            assert "backup written" in taken.stdout
            # still streaming: the backup was taken while ingest wrote
            eventually(lambda: _at_least(data, len(before) + 400), timeout=20)

            refused = chargewatch("restore", "--data-dir", str(data), str(out))
            assert refused.returncode != 0
            assert f"pid {service.process.proc.pid}" in refused.stderr  # type: ignore[union-attr]
            assert "stop it first" in refused.stderr
            assert len(stored_keys(data)) >= len(before)  # the running store untouched
            stream.finish()
        acked = stream.acked

    put = chargewatch("restore", "--data-dir", str(restored), str(out))
    assert put.returncode == 0, put.stderr
    got = stored_keys(restored)
    assert len(got) == len(set(got)), "nothing twice"
    missing = before - set(got)
    assert not missing, f"{len(missing)} acknowledged before the backup are missing"
    assert set(got) <= acked, "nothing the broker never took"
    assert len(got) < len(acked), "the backup is a point in the stream, not its end"

    # the restored store serves: its twins are the state as of the backup
    newest = {d: max(s for dd, _, s, t in got if dd == d and t == "status") for d in DEVICES}
    with (
        mosquitto(tmp_path / "mosquitto2") as broker2,
        chargewatch_serve(tmp_path / "serve2", broker2.url, data_dir=restored) as service,
    ):
        for device, seq in newest.items():
            assert service.get(f"/v1/devices/{device}").json()["status_seq"] == seq


def test_restore_refuses_a_file_that_is_not_a_chargewatch_store(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bak"
    bad.write_bytes(b"\x00garbage" * 4096)
    result = chargewatch("restore", "--data-dir", str(tmp_path / "data"), str(bad))
    assert result.returncode != 0
    assert "not a sound SQLite store" in result.stderr
    assert not (tmp_path / "data" / "chargewatch.db").exists()


def test_a_second_serve_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with (
        mosquitto(tmp_path / "mosquitto") as broker,
        chargewatch_serve(tmp_path / "serve", broker.url) as service,
    ):
        second = chargewatch(
            "serve", "--broker", broker.url, "--data-dir", str(service.data_dir), "--port", "0"
        )
        assert second.returncode != 0
        assert "stop it first" in second.stderr
        assert service.get("/readyz").status_code == 200


def test_the_documented_influxdb_1x_backup_and_restore_bring_the_history_back(
    tmp_path: Path,
) -> None:
    """docs/operations.md's commands for InfluxDB 1.x history, against influxd 1.6.7: an
    online portable backup, restored under a new name, holds every point written."""
    influxd_bin = need_binary("influxd", "/usr/bin/influxd")
    with influxd(tmp_path / "influxd") as server:
        conf = (tmp_path / "influxd" / "influxdb.conf").read_text()
        rpc = re.search(r'^bind-address = "(.*)"', conf, re.M)
        assert rpc is not None
        store = InfluxHistory(f"influx1://127.0.0.1:{server.port}?db=chargewatch")
        restored = InfluxHistory(f"influx1://127.0.0.1:{server.port}?db=chargewatch_restored")
        try:
            store.create_database()
            rows = district_rows()
            store.append(rows)
            host = ["-host", rpc.group(1)]
            backup_dir = str(tmp_path / "influx-backup")
            for argv in (
                ["backup", "-portable", *host, "-database", "chargewatch", backup_dir],
                [
                    "restore",
                    "-portable",
                    *host,
                    "-db",
                    "chargewatch",
                    "-newdb",
                    "chargewatch_restored",
                    backup_dir,
                ],
            ):
                done = subprocess.run(
                    [influxd_bin, *argv], capture_output=True, text=True, timeout=60, check=False
                )
                assert done.returncode == 0, done.stderr
            count = 'SELECT count("seq") FROM "message"'

            def loaded() -> list[dict[str, object]]:
                try:  # influxd enables a shard restored live a moment after restore returns
                    return restored.query(count)
                except StoreError as exc:
                    raise AssertionError(str(exc)) from exc

            assert eventually(loaded) == store.query(count) == [{"time": 0, "count": len(rows)}]
            device = next(r.device_id for r in rows)
            back = restored.messages(device, 0, 2**62, 100)
            assert back
            assert back == store.messages(device, 0, 2**62, 100)
        finally:
            store.close()
            restored.close()
