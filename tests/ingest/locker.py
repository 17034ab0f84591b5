"""Another process that holds a write lock on a SQLite file, as a careless tool (an admin's
``sqlite3`` shell, a backup script) would: ``BEGIN IMMEDIATE`` and wait."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SCRIPT = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
db.close()
"""


@contextmanager
def locked(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Hold the write lock on ``path`` from another process until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()  # bounded by the child's own 30 s busy timeout
        assert line.strip() == "locked", f"the locker did not get the lock: {line!r}"
        yield proc
    finally:
        try:
            if proc.poll() is None:
                proc.stdin.write("\n")
                proc.stdin.flush()
                proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(10)
        finally:
            proc.stdin.close()
            proc.stdout.close()
