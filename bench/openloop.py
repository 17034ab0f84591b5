"""An open-loop HTTP load generator: ``python -m bench.openloop URL RATE SECONDS``.

wrk (4.1, no wrk2 package in Debian) is closed-loop: each connection sends its next request
only after the answer, so a slow answer lowers the offered rate and hides its own cost
("coordinated omission"). Here request ``i`` is *scheduled* at ``start + i / rate``
whatever happened before, sent on an idle keep-alive connection (a new one is opened when
none is idle, up to ``--connections``; beyond that it waits for one), and its latency is
counted from its scheduled time to the last byte of the answer. So a stall of the server
shows up in every request scheduled during it, as a rider would see it.

Plain HTTP/1.1 over asyncio streams (no client library on the path), one process, loopback
only. Prints one JSON object: achieved rate, p50/p90/p99/p99.9/max latency, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any
from urllib.parse import urlsplit


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def fetch(self, request: bytes) -> int:
        """Send ``request``, read the whole answer; its status code."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding":
                raise ValueError("chunked answers are not supported here")
        if length:
            await self.reader.readexactly(length)
        return status


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def run(
    url: str,
    rate: float,
    seconds: float,
    connections: int = 64,
    warmup_s: float = 1.0,
    headers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Offer ``rate`` requests/s for ``warmup_s + seconds``; figures cover ``seconds``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    extra = "".join(f"{h}\r\n" for h in headers)
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: chargewatch-openloop\r\n"
        f"{extra}\r\n"
    ).encode()
    idle: asyncio.Queue[_Conn] = asyncio.Queue()
    opened = 0
    opening = asyncio.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def connection() -> _Conn:
        nonlocal opened
        if idle.empty() and opened < connections:
            async with opening:
                if idle.empty() and opened < connections:
                    opened += 1
                    return _Conn(*await asyncio.open_connection(host, port))
        return await idle.get()

    loop = asyncio.get_running_loop()
    total = int(rate * (warmup_s + seconds))
    start = loop.time() + 0.05
    measured_from = int(rate * warmup_s)

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors
        try:
            conn = await connection()
        except OSError:
            errors += 1
            return
        try:
            status = await conn.fetch(request)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            conn.writer.close()
            return
        done = loop.time()
        idle.put_nowait(conn)
        if i >= measured_from:
            latencies.append(done - scheduled)
            statuses[status] = statuses.get(status, 0) + 1

    i = 0
    while i < total:
        now = loop.time()
        while i < total and start + i / rate <= now:  # everything due is sent now
            task = asyncio.create_task(one(i, start + i / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
    end_scheduled = start + total / rate
    if tasks:
        await asyncio.wait(set(tasks), timeout=30)
    finished = loop.time()
    while not idle.empty():
        idle.get_nowait().writer.close()
    ordered = sorted(latencies)
    measured_s = max(finished, end_scheduled) - (start + warmup_s)
    return {
        "offered_rps": rate,
        "achieved_rps": len(ordered) / measured_s if measured_s > 0 else 0.0,
        "requests": len(ordered),
        "errors": errors,
        "statuses": {str(k): v for k, v in statuses.items()},
        "connections": opened,
        "p50_ms": _pct(ordered, 0.5) * 1000,
        "p90_ms": _pct(ordered, 0.9) * 1000,
        "p99_ms": _pct(ordered, 0.99) * 1000,
        "p999_ms": _pct(ordered, 0.999) * 1000,
        "max_ms": (ordered[-1] if ordered else 0.0) * 1000,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__)
    p.add_argument("url")
    p.add_argument("rate", type=float, help="requests per second offered")
    p.add_argument("seconds", type=float, help="measured seconds (after --warmup)")
    p.add_argument("--connections", type=int, default=64, help="most keep-alive connections")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds offered, not counted")
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    args = p.parse_args(argv)
    result = asyncio.run(
        run(args.url, args.rate, args.seconds, args.connections, args.warmup, tuple(args.header))
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
