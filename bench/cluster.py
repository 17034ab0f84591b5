"""The cluster's speed (issue 13): scale overhead, the PostgreSQL state path, a replica's p99.

All in one run, on the same mosquitto build, PostgreSQL and district-shaped messages
(``bench.workload``), each configuration on a fresh mosquitto and (for the cluster) a fresh
database:

- ``embedded``: ``chargewatch serve --broker`` (SQLite state, the one-machine path);
- ``1 worker`` / ``2 workers``: ``chargewatch ingest`` processes sharing the partitions
  through their PostgreSQL leases (state and history in PostgreSQL).

Each is started and waited for until it is subscribed (for the workers: every partition
owned, the leases settled); then ``count`` messages (a birth per device, then statuses) go
through it three ways (``_measure``): *drain* (the processes stopped, the messages published
into their persistent sessions, then the processes go on and drain full queues: the issue's
CPU per message at a load the workers can carry, full batches in every configuration; the
headline figures), *serial* (the same, the processes going on one at a time: each worker
alone beside PostgreSQL and mosquitto, as on a core of its own) and *live* (published while
they run, as fast as mosquitto takes them). The ingest processes' CPU (``/proc/PID/stat``,
user + system, every thread) is read before and after every message is acknowledged. CPU
time per message is the figure: the machine is shared, so a wall rate says as much about the
other load as about the code. PostgreSQL's own CPU (postmaster and backends) is read the same
way and reported beside it, and the messages per written batch.

Then, with the 2 workers still ingesting (a publisher at 10x the district's rate), a
``chargewatch api --db`` replica takes ``bench.openloop`` at 500 requests/s of the rider
station query; latency from each request's scheduled time.
"""

from __future__ import annotations

import contextlib
import os
import signal
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
WORKER_LOSSES = "chargewatch_ingest_lease_losses_total"
STORE_BATCHES = "chargewatch_store_write_seconds_count"  # one per batch written
# a worker's partitions' batches ready together share one (ingest.group_commit); serve's
# batch is its transaction
WORKER_TRANSACTIONS = "chargewatch_ingest_transactions_total"
MODES = ("drain", "serial", "live")  # ``_measure``; the drain's is the figure
STOPPED_MAX_S = 20.0  # publishing into stopped workers' sessions; their MQTT keepalive is 30 s
SERVE_ACKED = "chargewatch_messages_acked_total"


class LeasesLost(procs.BenchError):
    """A worker lost its leases while measured (a takeover in the figure): measured again.
    Drained, a worker stopped while its lease check was waiting for PostgreSQL finds the
    check's timeout past when it goes on, and drops its leases as it should."""


ATTEMPTS = 3


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


def _counters(ports: list[int], acked: str) -> dict[str, float]:
    """Summed over the ingest processes: messages acknowledged, batches and transactions
    written, and (for workers) the times every lease was lost."""
    out = {"acked": 0.0, "batches": 0.0, "transactions": 0.0, "losses": 0.0}
    for port in ports:
        text = httpx.get(f"http://{procs.LOOPBACK}:{port}/metrics", timeout=10).text
        out["acked"] += procs.metric(text, acked)
        batches = procs.metric(text, STORE_BATCHES)
        out["batches"] += batches
        if acked == WORKER_ACKED:
            out["losses"] += procs.metric(text, WORKER_LOSSES)
            out["transactions"] += procs.metric(text, WORKER_TRANSACTIONS)
        else:
            out["transactions"] += batches
    return out


def _drained(proc: procs.Proc, port: int, acked: str, base: float) -> None:
    """Until ``proc`` acknowledged more than ``base`` (its count before it was stopped) and
    then nothing more for two looks: its sessions' queues drained (draining, it acknowledges
    thousands a second). A worker with nothing queued: nothing for two seconds."""
    seen: list[float] = []

    def quiet() -> bool:
        seen.append(_counters([port], acked)["acked"])
        still = len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]
        return still and (seen[-1] > base or len(seen) >= 8)

    _until("a worker's sessions drained", quiet, 300, [proc])


def _measure(
    work: Path, port: int, catalog: Path, count: int, seed: int, mode: str,
    ingest: list[procs.Proc], acked: str, pg: pgserver.PgBench | None,
) -> dict[str, Any]:  # fmt: skip
    """``count`` messages through the ingest processes: their CPU until all are acknowledged.

    ``drain``: the processes are stopped (SIGSTOP: their sessions stay subscribed on the
    broker, their leases held by their connections), the messages are published into the
    sessions, then the processes go on (SIGCONT) and drain full queues; CPU from the moment
    they go on, so the publisher's time is in none of it: CPU per message at a load the
    workers carry, full batches in every configuration. ``serial``: the same, but the
    processes go on one at a time, each drained before the next (each alone beside
    PostgreSQL and mosquitto, as on a machine of its own; on this 2-core machine two workers
    draining at once share the cores with PostgreSQL and mosquitto, and contention inflates
    everyone's CPU per message). ``live``: published while the processes run, as fast as
    mosquitto takes them (the publisher on the same cores), CPU from just before it starts.
    A worker that lost its leases meanwhile fails the run (a takeover in the figure)."""
    ports = [int(p.port or 0) for p in ingest]
    before = _counters(ports, acked)
    bases = [_counters([p], acked)["acked"] for p in ports]

    def done() -> bool:
        return _counters(ports, acked)["acked"] - before["acked"] >= count

    def publisher() -> procs.Proc:
        return procs.agent(
            work, "publish", port=port, catalog=catalog, count=count, births=True, seed=seed
        ).start()

    if mode in ("drain", "serial"):
        for p in ingest:
            os.kill(p.pid, signal.SIGSTOP)
        try:
            pub = publisher()
            if pub.wait(STOPPED_MAX_S) != 0:
                raise procs.BenchError(f"the publisher failed: {pub.tail()}")
            cpu0 = sum(procs.cpu_s(p.pid) for p in ingest)
            pg0 = pg.cpu_s() if pg else {}
        finally:
            if mode == "drain":
                for p in ingest:
                    os.kill(p.pid, signal.SIGCONT)
        t0 = time.monotonic()
        if mode == "serial":
            for p, p_port, p_base in zip(ingest, ports, bases, strict=True):
                os.kill(p.pid, signal.SIGCONT)
                if p is not ingest[-1]:  # the last one: until every message is acknowledged
                    _drained(p, p_port, acked, p_base)
        _until("every message acknowledged", done, 300, ingest)
    else:
        cpu0 = sum(procs.cpu_s(p.pid) for p in ingest)
        pg0 = pg.cpu_s() if pg else {}
        t0 = time.monotonic()
        pub = publisher()
        try:
            _until("every message acknowledged", done, 300, ingest)
        finally:
            pub.stop()
    took = time.monotonic() - t0
    cpu = sum(procs.cpu_s(p.pid) for p in ingest) - cpu0
    after = _counters(ports, acked)
    if after["losses"] != before["losses"]:
        raise LeasesLost(f"{mode}: a worker lost its leases while measured")
    out: dict[str, Any] = {
        "messages": count,
        "seconds": took,
        "rate": count / took,
        "cpu_s": cpu,
        "cpu_us_per_msg": cpu / count * 1e6,
        "msgs_per_batch": count / max(1.0, after["batches"] - before["batches"]),
        "msgs_per_transaction": count / max(1.0, after["transactions"] - before["transactions"]),
        "loadavg_1m": os.getloadavg()[0],
    }
    if pg is not None:
        pg_cpu = pgserver.cpu_between(pg0, pg.cpu_s())
        out["pg_cpu_us_per_msg"] = pg_cpu / count * 1e6
    return out


def _embedded(
    work: Path, catalog: Path, count: int, seed: int, modes: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    with procs.running(procs.mosquitto(work / "mosquitto")) as mq:
        broker = f"mqtt://{procs.LOOPBACK}:{mq.port}"
        serve = procs.serve(work / "serve", broker, catalog)
        with procs.running(serve, timeout=60):
            procs.wait_ready(f"http://{procs.LOOPBACK}:{serve.port}")
            mq_port = int(mq.port or 0)
            out = {}
            for i, mode in enumerate(modes):
                out[mode] = _measure(
                    work / mode, mq_port, catalog, count, seed + 50 * i, mode, [serve],
                    SERVE_ACKED, None,
                )  # fmt: skip
            return out


def _busy(catalog: Path) -> int:
    """The partitions with stations (the others have nothing to subscribe)."""
    return len({station_partition(s, PARTITIONS) for s in Catalog.load(catalog).stations})


@contextlib.contextmanager
def _workers(
    work: Path, pg: pgserver.PgBench, catalog: Path, n: int, lease_s: float
) -> Iterator[tuple[procs.Proc, str, list[procs.Proc]]]:
    """A fresh mosquitto and database, ``n`` settled workers: (mosquitto, db, workers)."""
    busy = _busy(catalog)
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


def idle(procs_: list[procs.Proc], pg: pgserver.PgBench, seconds: float) -> dict[str, Any]:
    """CPU of settled processes doing nothing for ``seconds`` (not even a /metrics scrape):
    what a worker costs before its first message (lease checks, listeners, timers)."""
    cpu0, pg0 = [procs.cpu_s(p.pid) for p in procs_], pg.cpu_s()
    t0 = time.monotonic()
    time.sleep(seconds)
    took = time.monotonic() - t0
    cpu = [procs.cpu_s(p.pid) - c for p, c in zip(procs_, cpu0, strict=True)]
    return {
        "cpu_ms_per_s": sum(cpu) / took * 1e3,
        "per_process_ms_per_s": [c / took * 1e3 for c in cpu],
        "pg_cpu_ms_per_s": pgserver.cpu_between(pg0, pg.cpu_s()) / took * 1e3,
    }


def _cluster_run(
    work: Path, pg: pgserver.PgBench, catalog: Path, n: int, count: int, seed: int,
    modes: tuple[str, ...], lease_s: float, idle_s: float = 0.0,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    busy = _busy(catalog)
    with _workers(work, pg, catalog, n, lease_s) as (mq, _, ws):
        out = {}
        if idle_s > 0:
            out["idle"] = idle(ws, pg, idle_s)
        for i, mode in enumerate(modes):
            for attempt in range(ATTEMPTS):
                try:
                    out[mode] = _measure(
                        work / f"{mode}{attempt}", int(mq.port or 0), catalog, count,
                        seed + 50 * i + 1000 * attempt, mode, ws, WORKER_ACKED, pg,
                    )  # fmt: skip
                    break
                except LeasesLost as exc:
                    if attempt + 1 == ATTEMPTS:
                        raise
                    log(f"cluster {n} workers, {mode}: {exc}; again once the leases settled")
                    _until("the workers' leases settled", lambda: _settled(ws, busy), 120, ws)
        return out


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


CONFIGS = ("embedded", "1 worker", "2 workers")
Runs = dict[str, dict[str, list[dict[str, Any]]]]  # mode -> configuration -> rounds


def cluster(work: Path, plan: Plan) -> dict[str, Any] | None:
    """CPU per message of the embedded path, 1 worker and 2 workers, each drained from full
    sessions and fed live (configurations alternating, in ``plan.cluster_rounds`` rounds),
    their ratios, the sizing they give, and a replica's p99."""
    if not pgserver.available():
        log("cluster: PostgreSQL is not installed (Debian package postgresql): skipped")
        return None
    catalog = write_catalog(work / "catalog.json", plan.cluster_devices)
    count = plan.cluster_messages
    modes = plan.cluster_modes
    unknown = set(modes) - set(MODES)
    if unknown:
        raise procs.BenchError(f"cluster modes {sorted(unknown)}: use {', '.join(MODES)}")
    runs: Runs = {mode: {name: [] for name in CONFIGS} for mode in modes}
    idle_cpu: dict[str, list[dict[str, Any]]] = {"1 worker": [], "2 workers": []}
    with pgserver.postgresql() as pg:
        for r in range(plan.cluster_rounds):
            for name in CONFIGS:
                w = work / f"r{r}-{name.replace(' ', '')}"
                seed = 100 * (r + 1)
                if name == "embedded":
                    res = _embedded(w, catalog, count, seed, modes)
                else:
                    res = _cluster_run(
                        w,
                        pg,
                        catalog,
                        int(name[0]),
                        count,
                        seed,
                        modes,
                        plan.cluster_lease_s,
                        plan.cluster_idle_seconds,
                    )
                    idle_cpu[name].append(res.pop("idle"))
                    log(
                        f"cluster {name}, idle, round {r + 1}:"
                        f" {idle_cpu[name][-1]['cpu_ms_per_s']:.1f} ms CPU a second"
                    )
                for mode, one in res.items():
                    runs[mode][name].append(one)
                    log(f"cluster {name}, {mode}, round {r + 1}: {_line(one)}")
        api = replica_p99(
            work / "replica", pg, catalog, plan.cluster_api_seconds, plan.cluster_lease_s
        )
    log(
        f"cluster replica: {STATION_QUERY} at {RIDER_RPS:.0f} req/s while 2 workers ingest"
        f" {api['ingest_rate_during']:.0f} msg/s: p50 {api['p50_ms']:.1f} p99 {api['p99_ms']:.1f}"
        f" max {api['max_ms']:.1f} ms ({api['achieved_rps']:.0f} req/s achieved,"
        f" {api['errors']} errors)"
    )
    out = summarize(runs, api, plan.cluster_devices, status_sizes(specs_of(catalog)))
    out["idle"] = {
        name: {
            "cpu_ms_per_s": _med(v, "cpu_ms_per_s"),
            "pg_cpu_ms_per_s": _med(v, "pg_cpu_ms_per_s"),
        }
        for name, v in idle_cpu.items()
    }
    out["idle_seconds"] = plan.cluster_idle_seconds
    return out


def _line(res: dict[str, Any]) -> str:
    pg = f" (+ PostgreSQL {res['pg_cpu_us_per_msg']:.0f})" if "pg_cpu_us_per_msg" in res else ""
    return (
        f"{res['cpu_us_per_msg']:.0f} us CPU/msg{pg}, {res['rate']:.0f} msg/s wall,"
        f" load {res['loadavg_1m']:.1f}"
    )


def _med(runs: list[dict[str, Any]], key: str, older: str | None = None) -> float:
    """The median of ``key`` over ``runs``; ``older``: the key a run from before ``key``
    existed has instead (a report rendered again from an old JSON)."""
    return float(statistics.median(r[key] if key in r or older is None else r[older] for r in runs))


def sizing(cpu_us_per_msg: float) -> dict[str, float]:
    """What one core of ingest at ``cpu_us_per_msg`` carries, fully busy."""
    per_core = 1e6 / cpu_us_per_msg
    devices = per_core / (DISTRICT_MSG_S / DISTRICT_DEVICES)
    return {"msg_s_per_core": per_core, "devices_per_core": devices}


def summarize(
    runs: Runs,
    api: dict[str, Any],
    devices: int,
    sizes: dict[str, float],
) -> dict[str, Any]:
    """Medians per mode; the headline figures (overhead, PostgreSQL share, sizing) are the
    drain's (CPU per message at a load the workers carry), the live mode's beside them."""
    by_mode = {mode: _ratios(r) for mode, r in runs.items()}
    head = by_mode["drain"] if "drain" in by_mode else next(iter(by_mode.values()))
    cpu, pg_cpu = head["cpu_us_per_msg"], head["pg_cpu_us_per_msg"]
    return {
        "devices": devices,
        "partitions": PARTITIONS,
        "status_bytes": sizes,
        "runs": runs,
        "modes": by_mode,
        **head,
        "scale_overhead_target": OVERHEAD_TARGET,
        # each added worker core carries this share of what the first one does
        "added_core_msg_s": 1e6 / cpu["2 workers"],
        "pg_share_target": PG_SHARE_TARGET,
        "sizing": {
            "embedded (serve, SQLite)": sizing(cpu["embedded"]),
            "worker (PostgreSQL), 2 workers": sizing(cpu["2 workers"]),
            "worker + its PostgreSQL CPU": sizing(cpu["2 workers"] + pg_cpu["2 workers"]),
        },
        "replica": api,
        "p99_target_ms": P99_TARGET_MS,
        "targets_met": {
            "scale_overhead": head["scale_overhead"] <= OVERHEAD_TARGET,
            "pg_share": head["pg_share"] >= PG_SHARE_TARGET,
            "replica_p99": api["p99_ms"] < P99_TARGET_MS and not api["errors"],
        },
    }


def _ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    cpu = {k: _med(v, "cpu_us_per_msg") for k, v in runs.items()}
    pg_cpu = {k: _med(v, "pg_cpu_us_per_msg") for k, v in runs.items() if k != "embedded"}
    return {
        "cpu_us_per_msg": cpu,
        "pg_cpu_us_per_msg": pg_cpu,
        "scale_overhead": cpu["2 workers"] / cpu["1 worker"],
        "pg_share": cpu["embedded"] / cpu["1 worker"],  # rate per core is 1 / CPU per message
        "pg_share_with_db": cpu["embedded"] / (cpu["1 worker"] + pg_cpu["1 worker"]),
    }


def render(c: dict[str, Any] | None) -> list[str]:
    """The cluster part's section of docs/benchmarks.md."""
    if not c:
        return []
    pg_cpu, met = c["pg_cpu_us_per_msg"], c["targets_met"]
    rounds = len(next(iter(c["runs"].values()))["embedded"])
    lines = [
        "## The cluster: scale overhead, the PostgreSQL state path, a replica's rider query",
        "",
        f"{c['devices']:,} district-shaped devices in {c['partitions']} partitions (statuses of "
        + _sizes(c["status_bytes"])
        + "), a fresh mosquitto (and database) per configuration, configurations alternating"
        f" over {rounds} round(s); medians. CPU is user + system of the ingest processes from"
        " `/proc/PID/stat` (lease checks and /metrics scrapes are in it); PostgreSQL's"
        " (postmaster and backends) is beside it. *drain*: the processes stopped (SIGSTOP, their"
        " sessions and leases kept), the messages published into their sessions, then CPU from"
        " the moment they go on to the last acknowledgement: full batches, CPU per message at a"
        " load the workers carry (the headline figures). *serial*: the same, the processes"
        " going on one at a time, each drained before the next (each worker alone beside"
        " PostgreSQL and mosquitto, as on a core of its own). *live*: published while they run,"
        " as fast as mosquitto takes them (the publisher on the same cores), CPU from just before"
        " it starts. Wall rates are the shared machine's as much as ours: the figures are CPU"
        " per message.",
        "",
        "| configuration | mode | CPU us/msg (ingest) | + PostgreSQL us/msg | msgs/batch"
        " | msgs/transaction | msg/s wall | load 1m |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, by_name in c["runs"].items():
        m = c["modes"][mode]
        for name, runs in by_name.items():
            pg = f"{m['pg_cpu_us_per_msg'][name]:.0f}" if name in m["pg_cpu_us_per_msg"] else "-"
            lines.append(
                f"| {name} | {mode} | {m['cpu_us_per_msg'][name]:.0f} | {pg} |"
                f" {_med(runs, 'msgs_per_batch'):.0f} |"
                f" {_med(runs, 'msgs_per_transaction', 'msgs_per_batch'):.0f} |"
                f" {_med(runs, 'rate'):,.0f} |"
                f" {_med(runs, 'loadavg_1m'):.1f} |"
            )
    others = "; ".join(f"{mode}: {m['scale_overhead']:.2f}x" for mode, m in c["modes"].items())
    api = c["replica"]
    lines += [
        "",
        f"- **Scale overhead**: 2 workers / 1 worker = **{c['scale_overhead']:.2f}x** CPU per"
        f" message (target <= {c['scale_overhead_target']:.2f}x: {_met(met['scale_overhead'])})."
        f" Each added worker core carries ~{c['added_core_msg_s']:,.0f} msg/s"
        f" ({1 / c['scale_overhead']:.0%} of the first worker's core), plus"
        f" {pg_cpu['2 workers']:.0f} us of PostgreSQL CPU a message (by mode: {others}).",
        *_idle_line(c),
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


def _idle_line(c: dict[str, Any]) -> list[str]:
    idle = c.get("idle")
    if not idle:
        return []
    one, two = idle["1 worker"], idle["2 workers"]
    return [
        f"- **Workers doing nothing** ({c['idle_seconds']:.0f} s settled, no messages, no"
        f" scrapes): 1 worker (all {c['partitions']} partitions) {one['cpu_ms_per_s']:.1f} ms"
        f" of CPU a second, 2 workers {two['cpu_ms_per_s']:.1f} ms together (PostgreSQL"
        f" {one['pg_cpu_ms_per_s']:.1f} / {two['pg_cpu_ms_per_s']:.1f}): lease checks,"
        " listeners, timers, per partition and per process."
    ]


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _sizes(sizes: dict[str, float]) -> str:
    return ", ".join(f"{k} ~{v:,.0f} B" for k, v in sizes.items())
