"""The ``chargewatch`` command: serve, api, ingest, db, simulate, demo, catalog, keys,
broker-config, backup, restore, bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError

from api.settings import ServeSettings
from devices.catalog import Catalog, CatalogError
from ingest import IngestError

if TYPE_CHECKING:
    from ingest.service import Ingest

log = logging.getLogger("chargewatch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: we stop it ourselves, then clean up."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _http_server(app: Any, settings: ServeSettings) -> _Server:
    return _Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="off",
            # the client address (rate limits) from X-Forwarded-For only when it comes
            # from a proxy named in the settings; uvicorn trusts loopback by default
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=list(settings.trusted_proxies),
            # SSE streams stay open; do not wait for them forever on Ctrl-C
            timeout_graceful_shutdown=3,
        )
    )


async def _http(server: _Server) -> None:
    """The HTTP server's task. uvicorn says it cannot start (the port is taken, say) with
    ``sys.exit``: raised in a task, SystemExit leaves the event loop at once, past every
    clean-up. Here the task ends instead, and ``_serve_http`` sees it never started."""
    with contextlib.suppress(SystemExit):
        await server.serve()


async def _stop_when(stop: asyncio.Event, server: _Server) -> None:
    await stop.wait()
    server.should_exit = True


async def _serve_http(
    app: Any,
    settings: ServeSettings,
    ready: Callable[[str], Awaitable[None]],
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, or until ``stop`` is set; ``ready(url)`` once it
    listens. The server and the watch of ``stop`` are the command's tasks, in one TaskGroup:
    neither outlives it, and an error of either stops the other."""
    from ingest.gcpolicy import tune_gc

    server = _http_server(app, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    try:
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(_http(server), name="http")
            # uvicorn offers no "started" event to wait on
            while not server.started and not serving.done():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            if not server.started:  # uvicorn logged why
                raise SystemExit(f"cannot serve HTTP on {settings.host}:{settings.port}")
            port = server.servers[0].sockets[0].getsockname()[1]
            watch = None if stop is None else tg.create_task(_stop_when(stop, server), name="stop")
            tune_gc()
            await ready(f"http://{settings.host}:{port}")
            await asyncio.wait([serving])  # its error, if any, is the group's to raise
            if watch is not None:
                watch.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_api(settings: ServeSettings, db: str) -> None:
    """An API replica (``chargewatch api``): the whole API from PostgreSQL, the history from
    the InfluxDB ``settings.ingest.history`` names if any (``ingest.replica``), until
    SIGINT/SIGTERM."""
    from api.app import ApiStores, create_app
    from ingest.db.database import PgDatabase
    from ingest.replica import ReplicaReadSide, as_read_and_act

    async with ReplicaReadSide(db, settings.ingest) as side:
        # keys, audit log and riders in PostgreSQL: shared by every replica
        stores = await asyncio.to_thread(ApiStores.on, lambda: PgDatabase(db, pool_size=2))
        try:
            app = create_app(*as_read_and_act(side), settings, stores)

            async def ready(url: str) -> None:
                print(f"chargewatch api: serving {url} from {side.shown_url}", flush=True)

            await _serve_http(app, settings, ready)
        finally:
            await asyncio.to_thread(stores.close)


def cmd_api(args: argparse.Namespace) -> int:
    from ingest.db.cli import ENV

    if not args.db:
        print(f"chargewatch api: no database: give --db URL or set {ENV}", file=sys.stderr)
        return 2
    settings = _settings(args)
    try:
        asyncio.run(run_api(settings, args.db))
    except IngestError as exc:  # SchemaBehind, StoreUnavailable, ...
        print(f"chargewatch api: {exc}", file=sys.stderr)
        return 1
    return 0


async def run_serve(
    settings: ServeSettings,
    catalog: Catalog,
    on_ready: Callable[[str, Ingest], Any] | None = None,
    on_stop: Callable[[Ingest], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. ``on_ready(url, ingest)`` runs once HTTP is up; ``on_stop()``
    after HTTP stopped but while the broker and ingest still run."""
    from api.app import ApiStores, create_app
    from ingest.inprocess import read_and_act
    from ingest.service import FATAL_EXIT_STATUS, Ingest  # at run time: paho, sqlite, amqtt

    async with Ingest(settings.ingest, catalog) as ingest, contextlib.AsyncExitStack() as stack:
        # the API's own stores in the service's state database (its file, or PostgreSQL)
        stores = await asyncio.to_thread(ApiStores.on, ingest.statedb.database)
        stack.callback(stores.close)
        app = create_app(*read_and_act(ingest), settings, stores)  # the API sees nothing else
        ingest.count_reports_from(app.state.sentinels)  # riders' reports in the rollups

        async def ready(url: str) -> None:
            print(f"chargewatch: MQTT broker {ingest.broker_url}", flush=True)
            docs = f"{url}/docs" if settings.docs else f"{url}/openapi.json"
            print(f"chargewatch: serving {url} (API docs {docs})", flush=True)
            if on_ready is not None:
                started = on_ready(url, ingest)
                if asyncio.iscoroutine(started):
                    await started

        try:
            # a task that only a new process can bring back died (ingest.supervisor): stop,
            # and exit non-zero so that systemd or the like starts the service again
            await _serve_http(app, settings, ready, stop=ingest.stopping)
        finally:
            if on_stop is not None:
                await on_stop(ingest)
    if ingest.fatal is not None:
        raise SystemExit(FATAL_EXIT_STATUS)


def _settings(args: argparse.Namespace) -> ServeSettings:
    try:
        settings = ServeSettings()
    except ValidationError as exc:
        raise SystemExit(f"chargewatch: invalid setting: {exc}") from None
    ingest = settings.ingest.model_copy()
    for flag, field in (
        ("broker", "broker"),
        ("catalog", "catalog"),
        ("data_dir", "data_dir"),
        ("prefix", "topic_prefix"),
        ("broker_port", "embedded_broker_port"),
        ("broker_host", "embedded_broker_host"),
        ("broker_credentials", "embedded_broker_credentials"),
        ("cafile", "cafile"),
        ("history", "history"),
        ("db", "db"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(ingest, field, value)
    updates: dict[str, Any] = {"ingest": ingest}
    if args.host is not None:
        updates["host"] = args.host
    if args.port is not None:
        updates["port"] = args.port
    return settings.model_copy(update=updates)


def _load_catalog(path: Path | None) -> Catalog:
    try:
        return Catalog.load(path)
    except CatalogError as exc:
        raise SystemExit(f"chargewatch: {exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    catalog = _load_catalog(settings.ingest.catalog)
    try:
        asyncio.run(run_serve(settings, catalog))
    except IngestError as exc:
        raise SystemExit(f"chargewatch: {exc}") from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.broker_port is None:
        args.broker_port = _free_port()
    settings = _settings(args)
    if "CHARGEWATCH_DOCS" not in os.environ:  # a demo shows its API docs (CDN): api.headers
        settings = settings.model_copy(update={"docs": True})
    catalog = _load_catalog(settings.ingest.catalog)
    broker = f"mqtt://127.0.0.1:{settings.ingest.embedded_broker_port}"
    simulator: subprocess.Popen[bytes] | None = None

    def stop_simulator() -> None:
        """SIGTERM: every device says goodbye (its death) before it disconnects."""
        if simulator is not None and simulator.poll() is None:
            simulator.send_signal(signal.SIGTERM)
            try:
                simulator.wait(20)
            except subprocess.TimeoutExpired:
                simulator.kill()
                simulator.wait()

    async def stop_while_broker_runs(ingest: Ingest) -> None:
        await asyncio.to_thread(stop_simulator)
        await ingest.drain()  # the devices' goodbyes reach the store

    def start_simulator(url: str, ingest: Ingest) -> None:
        nonlocal simulator
        argv = [
            sys.executable,
            "-m",
            "simulators",
            "--broker",
            broker,
            "--speed",
            str(args.speed),
            "--seed",
            str(args.seed),
        ]
        if settings.ingest.catalog is not None:
            argv += ["--catalog", str(settings.ingest.catalog)]
        if settings.ingest.embedded_broker_credentials is not None:
            argv += ["--credentials", str(settings.ingest.embedded_broker_credentials)]
        simulator = subprocess.Popen(argv, start_new_session=True)
        print(
            f"chargewatch demo: {len(catalog.devices)} simulated devices at speed x{args.speed}"
            f" -> open {url}/  (Ctrl-C stops everything)",
            flush=True,
        )

    try:
        asyncio.run(
            run_serve(settings, catalog, on_ready=start_simulator, on_stop=stop_while_broker_runs)
        )
    except IngestError as exc:
        raise SystemExit(f"chargewatch: {exc}") from None
    finally:
        stop_simulator()  # on any other way out, too
    return 0


def cmd_simulate(argv: list[str]) -> int:
    from simulators.cli import main as simulate

    return simulate(argv)


def cmd_catalog(args: argparse.Namespace) -> int:
    catalog = _load_catalog(args.catalog)
    header = f"{'station':<18} {'piles':>5} {'ports':>5} {'cabinets':>8} {'slots':>5}  {'lat':>8} {'lon':>9}  {'hours':<11} name"
    print(f"catalog: {catalog.source}")
    print(header)
    totals = [0, 0, 0, 0]
    for s in catalog.stations.values():
        piles = [d for d in s.devices if d.kind == "pile"]
        cabinets = [d for d in s.devices if d.kind == "cabinet"]
        row = [
            len(piles),
            sum(d.units for d in piles),
            len(cabinets),
            sum(d.units for d in cabinets),
        ]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        print(
            f"{s.id:<18} {row[0]:>5} {row[1]:>5} {row[2]:>8} {row[3]:>5}  {s.lat:>8.4f} {s.lon:>9.4f}  {s.hours:<11} {s.name.zh} / {s.name.en}"
        )
    print(
        f"{'total':<18} {totals[0]:>5} {totals[1]:>5} {totals[2]:>8} {totals[3]:>5}  "
        f"{len(catalog.stations)} stations, {len(catalog.devices)} devices"
    )
    return 0


def cmd_backup(args: argparse.Namespace, data_dir: Path) -> int:
    from ingest.backup import BackupError, backup, restore

    try:
        if args.command == "backup":
            print(f"chargewatch: backup written: {backup(data_dir, args.out)}")
        else:
            print(f"chargewatch: restored: {restore(data_dir, args.file)}")
    except BackupError as exc:
        raise SystemExit(f"chargewatch: {exc}") from None
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chargewatch", description=__doc__)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    def server_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--broker", help="mqtt[s]://[user:pass@]host:port; default: embedded broker"
        )
        sp.add_argument("--cafile", type=Path, help="CA file for an mqtts:// broker")
        sp.add_argument("--broker-port", type=int, help="port of the embedded broker")
        sp.add_argument(
            "--broker-host", help="listen address of the embedded broker (default 127.0.0.1)"
        )
        sp.add_argument(
            "--broker-credentials",
            type=Path,
            metavar="FILE",
            help="credentials.json (broker-config): the embedded broker authenticates devices",
        )
        sp.add_argument("--catalog", type=Path, help="site catalog JSON; default: the district")
        sp.add_argument("--data-dir", type=Path, help="where the embedded store keeps its file")
        sp.add_argument(
            "--history", help="history store URL (influx2://… or influx1://…); default embedded"
        )
        sp.add_argument("--prefix", help="topic prefix (default cw/v1)")
        sp.add_argument("--host", help="HTTP listen address (default 127.0.0.1)")
        sp.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks one)")

    serve = sub.add_parser("serve", help="ingest + API in one process")
    server_flags(serve)
    serve.add_argument(
        "--db",
        default=os.environ.get("CHARGEWATCH_DB"),
        help="state database: postgresql://user@host/db (migrated by `chargewatch db upgrade`)"
        " or sqlite:///path; default: the embedded file in the data dir ($CHARGEWATCH_DB)",
    )
    replica = sub.add_parser("api", help="an API replica serving from PostgreSQL (the cluster)")
    replica.add_argument(
        "--db",
        default=os.environ.get("CHARGEWATCH_DB"),
        help="postgresql://user@host/db, the ingest workers' database (default: $CHARGEWATCH_DB)",
    )
    replica.add_argument(
        "--history",
        default=os.environ.get("CHARGEWATCH_HISTORY") or None,
        help="the InfluxDB the ingest workers write the history to (influx2://… or"
        " influx1://…, their --history; default: $CHARGEWATCH_HISTORY, else PostgreSQL)",
    )
    replica.add_argument("--host", help="HTTP listen address (default 127.0.0.1)")
    replica.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks one)")
    demo = sub.add_parser("demo", help="embedded broker + serve + the simulated district")
    server_flags(demo)
    demo.add_argument("--speed", type=float, default=60.0, help="simulated seconds per second")
    demo.add_argument("--seed", type=int, default=1)
    sub.add_parser(
        "simulate", help="a fleet of simulated devices (see simulate --help)", add_help=False
    )
    sub.add_parser("bench", help="benchmarks vs ceilings (see bench --help)", add_help=False)
    from api.auth import add_keys_parser

    add_keys_parser(sub)
    from ingest.brokerconfig import add_parser as add_broker_config_parser

    add_broker_config_parser(sub)
    from ingest.influxsetup import add_parser as add_influx_parser

    add_influx_parser(sub)
    from ingest.worker import add_parser as add_ingest_parser

    add_ingest_parser(sub)
    backup = sub.add_parser("backup", help="a consistent copy of the store, while serve runs")
    backup.add_argument("--data-dir", type=Path, help="the service's data dir")
    backup.add_argument("--out", type=Path, required=True, help="the backup file to write")
    restore = sub.add_parser("restore", help="put a backup in place (the service stopped)")
    restore.add_argument("--data-dir", type=Path, help="the service's data dir")
    restore.add_argument("file", type=Path, help="a file written by chargewatch backup")
    from ingest.db.cli import add_parser as add_db_parser

    add_db_parser(sub)
    cat = sub.add_parser("catalog", help="summary of the site catalog")
    cat.add_argument("--catalog", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        return cmd_simulate(argv[1:])
    if argv and argv[0] == "bench":
        from bench.cli import main as bench  # dev tooling, outside the product packages

        return bench(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "api":
        return cmd_api(args)
    if args.command == "keys":
        from api.auth import cmd_keys

        data_dir = args.data_dir or ServeSettings().ingest.data_dir
        if not args.db:
            return cmd_keys(args, data_dir)
        from ingest.statedb import StateDB

        try:
            state = StateDB.of(args.db, data_dir)
            return cmd_keys(args, data_dir, state.database)
        except IngestError as exc:  # a bad URL, the database unreachable
            raise SystemExit(f"chargewatch: {exc}") from None
    if args.command == "broker-config":
        from ingest.brokerconfig import command as broker_config

        return broker_config(args)
    if args.command == "influx":
        from ingest.influxsetup import command as influx_command

        return influx_command(args)
    if args.command == "ingest":
        from ingest.worker import command as ingest_command

        return ingest_command(args)
    if args.command == "db":
        from ingest.db.cli import cmd_db

        return cmd_db(args)
    if args.command in ("backup", "restore"):
        return cmd_backup(args, args.data_dir or ServeSettings().ingest.data_dir)
    if args.command == "demo":
        if args.data_dir is None:
            args.data_dir = Path(".demo-data")
        return cmd_demo(args)
    return cmd_catalog(args)


if __name__ == "__main__":
    sys.exit(main())
