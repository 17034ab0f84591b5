"""``chargewatch bench``: the benchmarks, as ratios to ceilings measured in the same run.

A composition root like ``api/cli.py``: it starts real processes (mosquitto, influxd,
``chargewatch serve``, the simulator, wrk) on loopback ports, drives them, stops them by PID,
and writes ``docs/benchmarks.md`` with ``docs/img/bench.png``.

Modules: ``workload`` (catalogs and payloads), ``procs`` (the processes), ``agents`` (the
measuring processes), ``suite`` (the benchmarks), ``alertbench``, ``report``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report, suite


def run(plan: suite.Plan, work: Path) -> dict[str, Any]:
    """Run the parts of ``plan``; a part that fails is reported, the others still run."""
    began = time.monotonic()
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": report.versions(),
        "errors": {},
    }
    for name, part in suite.PARTS.items():
        if name not in plan.parts:
            continue
        suite.log(f"--- {name}")
        try:
            (work / name).mkdir(parents=True, exist_ok=True)
            results[name] = part(work / name, plan)
        except Exception as exc:
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            suite.log(f"{name} failed:\n{traceback.format_exc()}")
    results["took_s"] = time.monotonic() - began
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chargewatch bench", description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="the <60 s CI check: throughput only")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(suite.PARTS)}")
    p.add_argument(
        "--history-devices", type=int, help="devices of the history part's day (default all)"
    )
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="report file")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--no-report", action="store_true", help="print JSON only")
    p.add_argument("--render", type=Path, help="only write the report from a --json file")
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server this run started is stopped by its PID
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = suite.Plan.short() if args.short else suite.Plan()
    if args.parts:
        unknown = set(args.parts.split(",")) - set(suite.PARTS)
        if unknown:
            p.error(f"unknown parts: {', '.join(sorted(unknown))}")
        plan.parts = frozenset(args.parts.split(","))
    if args.history_devices is not None:
        plan.history_devices = args.history_devices
    if args.render is not None:
        results = json.loads(args.render.read_text())
        return _write_report(results, args.out, results.get("command", "chargewatch bench"))
    with tempfile.TemporaryDirectory(prefix="chargewatch-bench-") as tmp:
        results = run(plan, Path(tmp))
    results["command"] = "chargewatch bench" + (" " + shlex.join(argv) if argv else "")
    text = json.dumps(results, indent=1, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    if args.no_report or args.short:
        print(text)
        return 1 if results["errors"] else 0
    return _write_report(results, args.out, results["command"]) or (1 if results["errors"] else 0)


def _write_report(results: dict[str, Any], out: Path, command: str) -> int:
    img = out.parent / "img" / "bench.png"
    plotted = report.plot(results, img)
    rel = os.path.relpath(img, out.parent) if plotted else None
    out.write_text(report.render(results, command, rel), encoding="utf-8")
    print(f"bench: wrote {out}" + (f" and {img}" if plotted else " (no matplotlib: no plot)"))
    return 0
