"""``python -m simulators`` / ``chargewatch simulate``: run the catalog's devices on a broker.

Prints ``READY <n>`` once every device's birth was acknowledged and, with ``--duration``,
``HOLD`` once behaviour froze and the truth log has its hold line. SIGINT/SIGTERM stop
every device gracefully (deaths published), flush the log, and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from devices.catalog import Catalog, CatalogError
from devices.contract import DEFAULT_HEARTBEAT_S
from devices.topics import DEFAULT_PREFIX
from simulators.config import BrokerAddress, FleetConfig, Shard, load_passwords
from simulators.errors import SimulatorError
from simulators.fleet import Fleet
from simulators.model import DEFAULT_FAULT_RATE
from simulators.truth import TruthLog

log = logging.getLogger("simulators")


def _start(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs an offset, e.g. +08:00 or Z")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chargewatch simulate",
        description="Simulated charging piles and swap cabinets speaking contract v1.",
    )
    p.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port (TLS)")
    p.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="credentials.json of chargewatch broker-config: each device logs in with its own"
        " password",
    )
    p.add_argument("--cafile", type=Path, help="CA file that verifies an mqtts:// broker")
    p.add_argument("--catalog", type=Path, help="catalog JSON (default: the shipped district)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--speed", type=float, default=1.0, help="sim seconds per wall second")
    p.add_argument("--duration", type=float, metavar="SIM_S", help="freeze after SIM_S, HOLD")
    p.add_argument("--truth", type=Path, metavar="FILE", help="JSON-lines ground-truth log")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix ({DEFAULT_PREFIX})")
    p.add_argument("--shard", default="1/1", metavar="I/N", help="run shard I of N (1-based)")
    p.add_argument(
        "--fault-rate",
        type=float,
        default=DEFAULT_FAULT_RATE,
        help=f"random faults per device per sim day (default {DEFAULT_FAULT_RATE})",
    )
    p.add_argument("--heartbeat-s", type=int, default=DEFAULT_HEARTBEAT_S, help="wall seconds")
    p.add_argument("--start", type=_start, help="RFC 3339 sim start (default: now)")
    p.add_argument(
        "--stats-s",
        type=float,
        metavar="S",
        help="print a STATS line every S wall seconds (JSON: born, connected, published, "
        "lag_max_s: the latest a heartbeat was due meanwhile, cpu_s)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level on stderr (default INFO)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        catalog = Catalog.load(args.catalog)
        config = FleetConfig(
            broker=BrokerAddress.parse(args.broker),
            prefix=args.prefix,
            seed=args.seed,
            speed=args.speed,
            start=args.start,
            duration_s=args.duration,
            heartbeat_s=args.heartbeat_s,
            fault_rate=args.fault_rate,
            shard=Shard.parse(args.shard),
            passwords=load_passwords(args.credentials) if args.credentials else None,
            cafile=args.cafile,
        )
    except (CatalogError, SimulatorError, ValueError) as exc:
        print(f"chargewatch simulate: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(catalog, config, args.truth, stats_s=args.stats_s))
    except SimulatorError as exc:  # found when the fleet is built: passwords, CA file
        print(f"chargewatch simulate: {exc}", file=sys.stderr)
        return 2


def _say(line: str) -> None:
    print(line, flush=True)


async def run(
    catalog: Catalog, config: FleetConfig, truth_path: Path | None, *, stats_s: float | None = None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        truth = await stack.enter_async_context(TruthLog(truth_path)) if truth_path else None
        began = time.monotonic()
        fleet = await stack.enter_async_context(Fleet(catalog, config, truth=truth))
        log.info("starting %d devices on %s", len(fleet), config.broker)
        async with asyncio.TaskGroup() as tg:
            announcer = tg.create_task(_announce(fleet, began), name="cli:announce")
            stats = None
            if stats_s is not None:
                stats = tg.create_task(_stats(fleet, stats_s), name="cli:stats")
            await stop.wait()
            log.info("stopping: graceful deaths for %d devices", len(fleet))
            announcer.cancel()
            if stats is not None:
                stats.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    return 0


async def _announce(fleet: Fleet, began: float) -> None:
    await fleet.ready()
    took = time.monotonic() - began
    log.info("%d devices born in %.1fs (%.0f/s)", len(fleet), took, len(fleet) / max(took, 1e-9))
    _say(f"READY {len(fleet)}")
    if fleet.context.end is not None:
        await fleet.hold()
        _say("HOLD")
    published, t0 = fleet.published, time.monotonic()
    while True:
        await asyncio.sleep(10)
        now, count = time.monotonic(), fleet.published
        log.info("%d connected, %.0f msg/s", fleet.connected, (count - published) / (now - t0))
        published, t0 = count, now


async def _stats(fleet: Fleet, every_s: float) -> None:
    """One ``STATS {...}`` line every ``every_s``: what the simulator itself did so far."""
    while True:
        cpu = os.times()
        line = {
            "t": round(time.monotonic(), 3),
            "born": fleet.born,
            "connected": fleet.connected,
            "published": fleet.published,
            "lag_max_s": round(fleet.stats.take_lag(), 3),
            "cpu_s": round(cpu.user + cpu.system, 3),
        }
        _say("STATS " + json.dumps(line, separators=(",", ":")))
        await asyncio.sleep(every_s)
