"""The cluster's speed (issue 13): scale overhead, the PostgreSQL state path, a replica's p99.

All in one run, on the same mosquitto build, PostgreSQL and district-shaped messages
(``bench.workload``), each configuration on a fresh mosquitto and (for the cluster) a fresh
database:

- ``embedded``: ``chargewatch serve --broker`` (SQLite state, the one-machine path);
- ``1 worker`` / ``2 workers``: ``chargewatch ingest`` processes sharing the partitions
  through their PostgreSQL leases (state and history in PostgreSQL).

Each is started and waited for until it is subscribed (for the workers: every partition
owned, the leases settled); then ``count`` messages (a birth per device, then statuses) are
published as fast as mosquitto takes them, and the ingest processes' CPU (``/proc/PID/stat``,
user + system, every thread) is read before and after every message is acknowledged. CPU
time per message is the figure: the machine is shared, so a wall rate says as much about the
other load as about the code. PostgreSQL's own CPU (postmaster and backends) is read the same
way and reported beside it.

Then, with the 2 workers still ingesting (a publisher at 10x the district's rate), a
``chargewatch api --db`` replica takes ``bench.openloop`` at 500 requests/s of the rider
station query; latency from each request's scheduled time.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench import pgserver, procs
from bench.workload import specs_of, status_sizes, write_catalog
from devices.catalog import Catalog
from ingest.partitions import station_partition

if TYPE_CHECKING:
    from bench.suite import Plan

PARTITIONS = 16
DISTRICT_DEVICES = 412
DISTRICT_MSG_S = 13.0  # the district's ~13 msg/s of its 412 devices (docs/benchmarks.md)
STATION_QUERY = "/v1/stations?lat=31.742&lon=117.296"
RIDER_RPS = 500.0
OVERHEAD_TARGET = 1.15
PG_SHARE_TARGET = 0.5
P99_TARGET_MS = 20.0
WORKER_ACKED = "chargewatch_ingest_acked_total"
SERVE_ACKED = "chargewatch_messages_acked_total"


def log(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


def _metric(port: int, name: str) -> float:
    text = httpx.get(f"http://{procs.LOOPBACK}:{port}/metrics", timeout=10).text
    return procs.metric(text, name)


def _until(what: str, done: Callable[[], bool], timeout: float, procs_: list[procs.Proc]) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        for p in procs_:
            if p.popen is not None and p.popen.poll() is not None:
                raise procs.BenchError(f"{p.argv[4:6]} exited while waiting for {what}: {p.tail()}")
        if time.monotonic() > deadline:
            raise procs.BenchError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.25)  # each look is a /metrics scrape: CPU of the processes measured


def worker(
    work: Path, name: str, broker: str, db: str, catalog: Path, lease_s: float
) -> procs.Proc:
    """``chargewatch ingest`` with its /metrics on a free port (``Proc.port``) and a lease
    timeout of ``lease_s`` (``CHARGEWATCH_LEASE_TIMEOUT_S``)."""
    port = procs.free_port()
    argv = procs.python_argv(
        "-m", "api.cli", "--log-level", "warning", "ingest", "--broker", broker, "--db", db,
        "--catalog", str(catalog), "--partitions", str(PARTITIONS), "--worker", name,
        "--metrics-port", str(port),
    )  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    env = {"CHARGEWATCH_LEASE_TIMEOUT_S": str(lease_s)}
    return procs.Proc(argv, work / f"{name}.log", port, env=env)


def _settled(workers: list[procs.Proc], busy: int) -> bool:
    """Every partition owned, each worker holding its share, every busy one subscribed."""
    owned = [_metric(int(w.port or 0), "chargewatch_ingest_partitions_owned") for w in workers]
    subscribed = sum(
        _metric(int(w.port or 0), "chargewatch_ingest_partitions_subscribed") for w in workers
    )
    share = PARTITIONS // len(workers)
    return sum(owned) == PARTITIONS and min(owned) >= share and subscribed >= busy


def _measure(
    work: Path, port: int, catalog: Path, count: int, seed: int,
    ingest: list[procs.Proc], acked: Callable[[], float], pg: pgserver.PgBench | None,
) -> dict[str, Any]:  # fmt: skip
    """Publish ``count`` messages; the ingest processes' CPU until all are acknowledged."""
    base = acked()
    cpu0 = sum(procs.cpu_s(p.pid) for p in ingest)
    pg0 = pg.cpu_s() if pg else {}
    t0 = time.monotonic()
    pub = procs.agent(
        work, "publish", port=port, catalog=catalog, count=count, births=True, seed=seed
    ).start()
    try:
        _until("every message acknowledged", lambda: acked() - base >= count, 300, ingest)
    finally:
        pub.stop()
    took = time.monotonic() - t0
    cpu = sum(procs.cpu_s(p.pid) for p in ingest) - cpu0
    out: dict[str, Any] = {
        "messages": count,
        "seconds": took,
        "rate": count / took,
        "cpu_s": cpu,
        "cpu_us_per_msg": cpu / count * 1e6,
        "loadavg_1m": os.getloadavg()[0],
    }
    if pg is not None:
        pg_cpu = pgserver.cpu_between(pg0, pg.cpu_s())
        out["pg_cpu_us_per_msg"] = pg_cpu / count * 1e6
    return out


def _embedded(work: Path, catalog: Path, count: int, seed: int) -> dict[str, Any]:
    with procs.running(procs.mosquitto(work / "mosquitto")) as mq:
        broker = f"mqtt://{procs.LOOPBACK}:{mq.port}"
        serve = procs.serve(work / "serve", broker, catalog)
        with procs.running(serve, timeout=60):
            procs.wait_ready(f"http://{procs.LOOPBACK}:{serve.port}")
            port = int(serve.port or 0)
            return _measure(
                work, int(mq.port or 0), catalog, count, seed, [serve],
                lambda: _metric(port, SERVE_ACKED), None,
            )  # fmt: skip


@contextlib.contextmanager
def _workers(
    work: Path, pg: pgserver.PgBench, catalog: Path, n: int, lease_s: float
) -> Iterator[tuple[procs.Proc, str, list[procs.Proc]]]:
    """A fresh mosquitto and database, ``n`` settled workers: (mosquitto, db, workers)."""
    busy = len({station_partition(s, PARTITIONS) for s in Catalog.load(catalog).stations})
    db = pg.create_database(work.name.replace("-", "_"))
    from ingest.db import migrate

    migrate.upgrade(migrate.engine_url(db))
    with contextlib.ExitStack() as stack:
        mq = stack.enter_context(procs.running(procs.mosquitto(work / "mosquitto")))
        broker = f"mqtt://{procs.LOOPBACK}:{mq.port}"
        ws = stack.enter_context(
            procs.running_together(
                [worker(work, f"w{i + 1}", broker, db, catalog, lease_s) for i in range(n)], 60
            )
        )
        _until("the workers' leases settled", lambda: _settled(ws, busy), 120, ws)
        yield mq, db, ws


def _cluster_run(
    work: Path, pg: pgserver.PgBench, catalog: Path, n: int, count: int, seed: int,
    lease_s: float,
) -> dict[str, Any]:  # fmt: skip
    with _workers(work, pg, catalog, n, lease_s) as (mq, _, ws):
        ports = [int(w.port or 0) for w in ws]
        return _measure(
            work, int(mq.port or 0), catalog, count, seed, ws,
            lambda: sum(_metric(p, WORKER_ACKED) for p in ports), pg,
        )  # fmt: skip


def replica_p99(
    work: Path, pg: pgserver.PgBench, catalog: Path, seconds: float, lease_s: float
) -> dict[str, Any]:
    """The rider station query on a ``chargewatch api --db`` replica at 500 requests/s
    (open loop) while 2 workers ingest 10x the district's rate."""
    from bench.suite import DISTRICT_RATE, open_loop

    with _workers(work, pg, catalog, 2, lease_s) as (mq, db, ws):
        port = procs.free_port()
        api = procs.Proc(
            procs.python_argv(
                "-m", "api.cli", "--log-level", "warning", "api", "--db", db, "--port", str(port)
            ),
            work / "api.log", port, env={"CHARGEWATCH_INGEST__DATA_DIR": str(work / "api")},
        )  # fmt: skip
        with procs.running(api, 60):
            base = f"http://{procs.LOOPBACK}:{port}"
            rate = 10 * DISTRICT_RATE
            pub = procs.agent(
                work / "background", "publish", port=int(mq.port or 0), catalog=catalog,
                count=int(rate * (seconds + 30)), rate=rate, births=True, seed=77,
                max_s=seconds + 60,
            ).start()  # fmt: skip
            try:
                ports = [int(w.port or 0) for w in ws]
                _until(  # the replica has twins to answer with
                    "the background's first messages acknowledged",
                    lambda: sum(_metric(p, WORKER_ACKED) for p in ports) >= 100, 60, [*ws, api],
                )  # fmt: skip
                answer = httpx.get(base + STATION_QUERY, timeout=10)
                answer.raise_for_status()
                acked0 = sum(_metric(p, WORKER_ACKED) for p in ports)
                t0 = time.monotonic()
                out = open_loop(base + STATION_QUERY, RIDER_RPS, seconds, api.pid)
                ingested = sum(_metric(p, WORKER_ACKED) for p in ports) - acked0
                out["ingest_rate_during"] = ingested / (time.monotonic() - t0)
            finally:
                pub.stop()
        out["answer_bytes"] = len(answer.content)
        out["stations"] = len(answer.json()["stations"])
        out["offered_ingest_rate"] = rate
    return out


def cluster(work: Path, plan: Plan) -> dict[str, Any] | None:
    """CPU per message of the embedded path, 1 worker and 2 workers (alternating, in
    ``plan.cluster_rounds`` rounds), their ratios, the sizing they give, and a replica's p99."""
    if not pgserver.available():
        log("cluster: PostgreSQL is not installed (Debian package postgresql): skipped")
        return None
    catalog = write_catalog(work / "catalog.json", plan.cluster_devices)
    count = plan.cluster_messages
    runs: dict[str, list[dict[str, Any]]] = {"embedded": [], "1 worker": [], "2 workers": []}
    with pgserver.postgresql() as pg:
        for r in range(plan.cluster_rounds):
            for name in runs:
                w = work / f"r{r}-{name.replace(' ', '')}"
                seed = 100 * (r + 1) + len(runs[name])
                if name == "embedded":
                    res = _embedded(w, catalog, count, seed)
                else:
                    res = _cluster_run(
                        w, pg, catalog, int(name[0]), count, seed, plan.cluster_lease_s
                    )
                runs[name].append(res)
                log(
                    f"cluster {name}, round {r + 1}: {res['cpu_us_per_msg']:.0f} us CPU/msg"
                    + (
                        f" (+ PostgreSQL {res['pg_cpu_us_per_msg']:.0f})"
                        if "pg_cpu_us_per_msg" in res
                        else ""
                    )
                    + f", {res['rate']:.0f} msg/s wall, load {res['loadavg_1m']:.1f}"
                )
        api = replica_p99(
            work / "replica", pg, catalog, plan.cluster_api_seconds, plan.cluster_lease_s
        )
    log(
        f"cluster replica: {STATION_QUERY} at {RIDER_RPS:.0f} req/s while 2 workers ingest"
        f" {api['ingest_rate_during']:.0f} msg/s: p50 {api['p50_ms']:.1f} p99 {api['p99_ms']:.1f}"
        f" max {api['max_ms']:.1f} ms ({api['achieved_rps']:.0f} req/s achieved,"
        f" {api['errors']} errors)"
    )
    return summarize(runs, api, plan.cluster_devices, status_sizes(specs_of(catalog)))


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def sizing(cpu_us_per_msg: float) -> dict[str, float]:
    """What one core of ingest at ``cpu_us_per_msg`` carries, fully busy."""
    per_core = 1e6 / cpu_us_per_msg
    devices = per_core / (DISTRICT_MSG_S / DISTRICT_DEVICES)
    return {"msg_s_per_core": per_core, "devices_per_core": devices}


def summarize(
    runs: dict[str, list[dict[str, Any]]],
    api: dict[str, Any],
    devices: int,
    sizes: dict[str, float],
) -> dict[str, Any]:
    cpu = {k: _med(v, "cpu_us_per_msg") for k, v in runs.items()}
    pg_cpu = {k: _med(v, "pg_cpu_us_per_msg") for k, v in runs.items() if k != "embedded"}
    overhead = cpu["2 workers"] / cpu["1 worker"]
    pg_share = cpu["embedded"] / cpu["1 worker"]  # rate per core is 1 / CPU per message
    pg_share_with_db = cpu["embedded"] / (cpu["1 worker"] + pg_cpu["1 worker"])
    return {
        "devices": devices,
        "partitions": PARTITIONS,
        "status_bytes": sizes,
        "runs": runs,
        "cpu_us_per_msg": cpu,
        "pg_cpu_us_per_msg": pg_cpu,
        "scale_overhead": overhead,
        "scale_overhead_target": OVERHEAD_TARGET,
        # each added worker core carries this share of what the first one does
        "added_core_msg_s": 1e6 / cpu["2 workers"],
        "pg_share": pg_share,
        "pg_share_with_db": pg_share_with_db,
        "pg_share_target": PG_SHARE_TARGET,
        "sizing": {
            "embedded (serve, SQLite)": sizing(cpu["embedded"]),
            "worker (PostgreSQL), 2 workers": sizing(cpu["2 workers"]),
            "worker + its PostgreSQL CPU": sizing(cpu["2 workers"] + pg_cpu["2 workers"]),
        },
        "replica": api,
        "p99_target_ms": P99_TARGET_MS,
        "targets_met": {
            "scale_overhead": overhead <= OVERHEAD_TARGET,
            "pg_share": pg_share >= PG_SHARE_TARGET,
            "replica_p99": api["p99_ms"] < P99_TARGET_MS and not api["errors"],
        },
    }


def render(c: dict[str, Any] | None) -> list[str]:
    """The cluster part's section of docs/benchmarks.md."""
    if not c:
        return []
    cpu, pg_cpu, met = c["cpu_us_per_msg"], c["pg_cpu_us_per_msg"], c["targets_met"]
    rounds = len(c["runs"]["embedded"])
    lines = [
        "## The cluster: scale overhead, the PostgreSQL state path, a replica's rider query",
        "",
        f"{c['devices']:,} district-shaped devices in {c['partitions']} partitions (statuses of "
        + _sizes(c["status_bytes"])
        + "), a fresh mosquitto (and database) per configuration, configurations alternating"
        f" over {rounds} round(s); medians. CPU is user + system of the ingest processes from"
        " `/proc/PID/stat`, from just before the publisher starts to the last acknowledgement"
        " (so lease renewals and /metrics scrapes are in it); PostgreSQL's (postmaster and"
        " backends) is beside it. Wall rates are the publisher's and the shared machine's as"
        " much as ours: the figures are CPU per message.",
        "",
        "| configuration | CPU us/msg (ingest) | + PostgreSQL us/msg | msg/s wall | load 1m |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in c["runs"].items():
        pg = f"{pg_cpu[name]:.0f}" if name in pg_cpu else "-"
        lines.append(
            f"| {name} | {cpu[name]:.0f} | {pg} | {_med(runs, 'rate'):,.0f} |"
            f" {_med(runs, 'loadavg_1m'):.1f} |"
        )
    api = c["replica"]
    lines += [
        "",
        f"- **Scale overhead**: 2 workers / 1 worker = **{c['scale_overhead']:.2f}x** CPU per"
        f" message (target <= {c['scale_overhead_target']:.2f}x: {_met(met['scale_overhead'])})."
        f" Each added worker core carries ~{c['added_core_msg_s']:,.0f} msg/s"
        f" ({1 / c['scale_overhead']:.0%} of the first worker's core), plus"
        f" {pg_cpu['2 workers']:.0f} us of PostgreSQL CPU a message.",
        f"- **PostgreSQL state path**: embedded / 1 worker = **{c['pg_share']:.0%}** of the"
        f" embedded path's rate per core ({c['pg_share_with_db']:.0%} counting PostgreSQL's CPU"
        f" too; target >= {c['pg_share_target']:.0%}: {_met(met['pg_share'])}).",
        f"- **Rider station query on a replica** (`chargewatch api --db`, `{STATION_QUERY}`,"
        f" {api['stations']} stations, {api['answer_bytes']:,} bytes) at"
        f" {api['offered_rps']:.0f} req/s open loop while 2 workers ingest"
        f" {api['ingest_rate_during']:.0f} msg/s: p50 {api['p50_ms']:.1f}, p99"
        f" **{api['p99_ms']:.1f}**, max {api['max_ms']:.1f} ms, {api['achieved_rps']:.0f} req/s"
        f" achieved, {api['errors']} errors, {api['server_cpu_us_per_request']:.0f} us of the"
        f" replica's CPU a request, load {api['loadavg_1m']:.1f} (target p99 <"
        f" {c['p99_target_ms']:.0f} ms: {_met(met['replica_p99'])}).",
        "",
        f"Sizing, one core fully busy (the district: {DISTRICT_MSG_S:.0f} msg/s of"
        f" {DISTRICT_DEVICES} devices; plan for half of it):",
        "",
        "| ingest | msg/s per core | devices per core | devices per core at 50% |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, s in c["sizing"].items():
        lines.append(
            f"| {name} | {s['msg_s_per_core']:,.0f} | {s['devices_per_core']:,.0f} |"
            f" {s['devices_per_core'] / 2:,.0f} |"
        )
    return [*lines, ""]


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _sizes(sizes: dict[str, float]) -> str:
    return ", ".join(f"{k} ~{v:,.0f} B" for k, v in sizes.items())
