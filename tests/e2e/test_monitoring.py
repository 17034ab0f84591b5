"""The files operators load into their own tools (deploy/): the Prometheus alert rules, checked
and unit-tested by Debian's `promtool`; the Grafana dashboard, its PromQL parsed and
evaluated by `promtool` over scrapes of a real `chargewatch serve` (which exports every metric
the rules and the dashboard name), and every InfluxQL query run against a real influxd 1.6.7
holding history written by InfluxHistory. The cluster's rules name what a worker and a
replica export."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import generate_latest

from ingest.influx import InfluxHistory
from tests.e2e.test_influx import NOW_MS, district_rows
from tests.influx_servers import influxd
from tests.servers import Service, chargewatch_serve, eventually, free_port, need_binary

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "chargewatch.rules.yml"
RULES_TESTS = DEPLOY / "prometheus" / "chargewatch.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "chargewatch.json"


@pytest.fixture(scope="module")
def promtool() -> str:
    return need_binary("promtool", "/usr/bin/promtool")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def targets(datasource: str) -> Iterator[dict[str, Any]]:
    """Every query target of the dashboard's panels on one kind of data source."""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            if target["datasource"]["type"] == datasource:
                yield {"panel": panel["title"], **target}


# -- Prometheus rules ----------------------------------------------------------------------


def test_the_alert_rules_pass_promtool_check(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_each_alert_fires_in_promtools_unit_tests_and_none_on_a_healthy_service(
    promtool: str,
) -> None:
    cases = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    fired = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    healthy = next(c for c in cases if c["name"].startswith("healthy"))
    quiet = {t["alertname"] for t in healthy["alert_rule_test"] if t["exp_alerts"] == []}
    names = set(alert_names())
    assert names - fired == set(), "every alert has a test in which it fires"
    assert names - quiet == set(), "and is checked quiet on a healthy service"

    result = run(promtool, "test", "rules", str(RULES_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_cluster_rules_name_what_a_worker_and_a_replica_export() -> None:
    """Group "chargewatch-cluster": every metric it names is exported by `chargewatch ingest`
    (the worker's registry, with the pipelines' metrics on it, as ``run_worker`` makes it) or
    by `chargewatch api` (the replica's); none of serve's own metrics is needed."""
    from devices.catalog import Catalog
    from ingest.metrics import IngestMetrics
    from ingest.mqtt import BrokerURL
    from ingest.partitions import PartitionMap
    from ingest.replica import ReplicaReadSide
    from ingest.worker import Worker

    (group,) = [
        g for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"] != "chargewatch"
    ]
    assert group["name"] == "chargewatch-cluster"
    wanted = {
        m for r in group["rules"] for m in re.findall(r"\b(?:chargewatch|cw)_[a-z_]+", r["expr"])
    }
    assert len(wanted) >= 9

    def unused(p: int, epoch: int) -> Any:
        raise AssertionError("not started")

    url = "postgresql://nobody@127.0.0.1:1/none"  # neither is started: nothing connects
    worker = Worker(broker=BrokerURL.parse("mqtt://127.0.0.1:1"), db=url,
                    partitions=PartitionMap(Catalog.load(), 4), consumer_factory=unused,
                    name="w")  # fmt: skip
    IngestMetrics(worker.metrics.registry)
    text = generate_latest(worker.metrics.registry).decode()
    text += ReplicaReadSide(url).metrics().decode()
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert sorted(wanted - exported) == []


# -- the dashboard's PromQL ----------------------------------------------------------------

GRAFANA_PROM_MACROS = {"$__rate_interval": "1m", "$__interval": "30s", "$instance": ".*"}


def _expand(text: str, macros: dict[str, str]) -> str:
    for macro, value in sorted(macros.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(macro, value)
    left = re.findall(r"\$\{?[A-Za-z_]\w*", text)
    assert not left, f"Grafana variables {left} left unexpanded in {text!r}"
    return text


def test_every_promql_expression_of_the_dashboard_parses(promtool: str, tmp_path: Path) -> None:
    """Syntax and types only (promtool parses each as a recording rule): what each panel
    shows on real data is for an operator's eyes; the metric names are checked below."""
    exprs = [_expand(t["expr"], GRAFANA_PROM_MACROS) for t in targets("prometheus")]
    assert len(exprs) >= 15
    rules = [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    wrapped = tmp_path / "dashboard.rules.yml"
    wrapped.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(wrapped))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# Series that a quiet service has no child of yet: one per webhook delivery result, one per
# task that died. A panel over them is empty until the first delivery or death.
EMPTY_WHILE_QUIET = ("chargewatch_webhook_deliveries_total", "chargewatch_task_deaths_total")
SAMPLE = re.compile(r"^(?P<series>[a-z_:][a-z0-9_:]*(?:\{.*\})?) (?P<value>\S+)$")


def scrape(service: Service) -> dict[str, str]:
    """/metrics as {series with job and instance labels: value in promtool's notation}."""
    found = {}
    for line in service.get("/metrics").text.splitlines():
        m = SAMPLE.match(line)
        if m is None:
            continue
        name, _, labels = m["series"].partition("{")
        labels = labels.rstrip("}")
        extra = 'job="chargewatch",instance="cw:8000"'
        series = f"{name}{{{extra}{',' + labels if labels else ''}}}"
        found[series] = {"+Inf": "Inf", "-Inf": "-Inf"}.get(m["value"], m["value"])
    return found


def test_rules_and_dashboard_promql_run_on_a_real_services_metrics(
    promtool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every metric the rules and the dashboard name is exported by a real `serve`, and every
    PromQL expression of the dashboard, evaluated by promtool over two scrapes of it (a
    minute apart in promtool's time), returns series (a panel that would stay empty)."""
    # the disk projection is exported once a tenth of its window is measured: make it short
    monkeypatch.setenv("CHARGEWATCH_INGEST__DISK_CHECK_S", "0.1")
    monkeypatch.setenv("CHARGEWATCH_INGEST__DISK_GROWTH_WINDOW_S", "2")
    rules = [g for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"] == "chargewatch"]
    named = {
        *(r["expr"] for g in rules for r in g["rules"]),
        *(t["expr"] for t in targets("prometheus")),
    }
    wanted = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for expr in named
        for m in re.findall(r"\bchargewatch_[a-z_]+", expr)
    }
    assert len(wanted) >= 20
    broker_port = free_port()
    with influxd(tmp_path / "influxd") as server:
        url = f"influx1://127.0.0.1:{server.port}?db=chargewatch"
        history = InfluxHistory(url)
        history.create_database()
        history.append(district_rows())  # a shard to measure
        history.close()
        with chargewatch_serve(
            tmp_path / "serve", None, "--history", url, broker_port=broker_port
        ) as service:

            def exported() -> set[str]:
                names = {
                    line.split()[2]
                    for line in service.get("/metrics").text.splitlines()
                    if line.startswith("# TYPE ")
                }
                assert "chargewatch_disk_full_in_seconds" in names
                assert "chargewatch_history_disk_bytes" in names
                return names

            names = eventually(exported, timeout=20)
            first = scrape(service)
            publish_raw(broker_port, "cw/v1/SVC-P01/status", b"not json")  # a dead letter

            def counted() -> dict[str, str]:
                now = scrape(service)
                assert any(k.startswith("chargewatch_dead_letters_total{") for k in now)
                return now

            second = eventually(counted, timeout=20)
    assert sorted(wanted - names) == []

    exprs = [
        _expand(t["expr"], {**GRAFANA_PROM_MACROS, "$__rate_interval": "3m"})
        for t in targets("prometheus")
    ]
    rules_file = tmp_path / "panels.rules.yml"
    rules_file.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "panels",
                        "rules": [
                            {"alert": f"Panel{i}", "expr": f"count({e}) > 0"}
                            for i, e in enumerate(exprs)
                        ],
                    }
                ]
            }
        )
    )
    series = [
        {"series": k, "values": f"{first.get(k, '_')} {v} {v} {v}"} for k, v in second.items()
    ]
    cases = [
        {
            "eval_time": "3m",
            "alertname": f"Panel{i}",
            "exp_alerts": [] if any(m in e for m in EMPTY_WHILE_QUIET) else [{"exp_labels": {}}],
        }
        for i, e in enumerate(exprs)
    ]
    assert sum(1 for c in cases if c["exp_alerts"]) >= len(exprs) - 2
    tests_file = tmp_path / "panels.test.yml"
    tests_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rules_file.name],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": cases}],
            }
        )
    )
    result = run(promtool, "test", "rules", str(tests_file))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def publish_raw(port: int, topic: str, payload: bytes) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="monitoring-test")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


# -- the dashboard's InfluxQL --------------------------------------------------------------


def test_every_influxql_query_of_the_dashboard_returns_rows_from_real_influxd(
    tmp_path: Path,
) -> None:
    with influxd(tmp_path / "influxd") as server:
        store = InfluxHistory(f"influx1://127.0.0.1:{server.port}?db=chargewatch", retry_s=2)
        try:
            store.create_database()
            rows = district_rows()
            store.append(rows)  # the service's own writer: births, statuses, events, a death
            assert (store.disk_bytes() or 0) > 0  # its shards, as SHOW STATS tells
            other = InfluxHistory(f"influx1://127.0.0.1:{server.port}?db=absent", retry_s=1)
            assert other.disk_bytes() is None  # a database with no shard: not known, not 0
            other.close()
            # what Grafana puts in place of its macros (the station variable at "All")
            macros = {
                "$timeFilter": f"time >= {NOW_MS - 60_000}ms and time <= {NOW_MS + 600_000}ms",
                "$__interval": "10s",
                "$station": ".*",
            }
            variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
            queries = [(t["panel"], _expand(t["query"], macros)) for t in targets("influxdb")]
            queries += [
                (f"variable {v['name']}", v["query"])
                for v in variables
                if v.get("datasource", {}).get("type") == "influxdb"
            ]
            assert len(queries) >= 9
            empty = [(panel, q) for panel, q in queries if not store.query(q)]
            assert empty == []
            stations = {r["value"] for r in store.query(queries[-1][1])}
            assert stations == {r.station_id for r in rows}
            # and a chosen station narrows the panels to it
            one = rows[0].station_id
            narrowed = _expand(
                next(t["query"] for t in targets("influxdb") if "Faults" in t["panel"]),
                {**macros, "$station": re.escape(one)},
            )
            assert {r["station"] for r in store.query(narrowed)} == {one}
        finally:
            store.close()
