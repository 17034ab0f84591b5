"""Backups of the embedded store, and the lock that says a service runs on a data dir.

    backup(data_dir, out)     a consistent copy while ingest runs (SQLite's online backup API,
                              which reads the WAL too: every committed batch is in it)
    restore(data_dir, file)   checks a copy and puts it in place, the replaced file kept aside;
                              refused while a service holds the data dir's lock
    DataDirLock(data_dir)     what ``serve`` holds while it runs (``flock``: a crashed
                              process holds nothing, the OS released it)

Exceptions::

    IngestError
    └── BackupError        no store to back up, or the copy could not be written
        ├── DataDirInUse   a service runs on the data dir (restore waits for it to stop)
        └── NotABackup     the file is not a sound chargewatch store (corrupt, other schema)
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from ingest import IngestError
from ingest.sqlite_store import DB_FILE

LOCK_FILE = "chargewatch.lock"
# The ingest store's own tables: a file without them is not a chargewatch store (the alert
# and key tables are created on open when missing, so an older backup may lack them).
REQUIRED_TABLES = ("messages", "twins", "dead_letters")


class BackupError(IngestError):
    pass


class DataDirInUse(BackupError):
    pass


class NotABackup(BackupError):
    pass


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/chargewatch.lock``, not waited for: taken or
    refused at once. The file keeps the holder's pid, for the message of whoever is refused."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise BackupError(f"cannot open the lock {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(
                f"a chargewatch service (pid {holder}) runs on {self.path.parent}: stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@dataclass(frozen=True)
class Summary:
    """What a backup or a restored file holds."""

    path: Path
    size: int
    messages: int
    twins: int
    kept_aside: Path | None = None  # restore: where the replaced store went

    def __str__(self) -> str:
        text = f"{self.path} ({self.size} bytes, {self.messages} messages, {self.twins} twins)"
        if self.kept_aside is not None:
            text += f"; the replaced store is kept as {self.kept_aside}"
        return text


def backup(data_dir: str | Path, out: str | Path) -> Summary:
    """Copy the data dir's store to ``out`` (mode 0600, replaced atomically) while the
    service may be writing: one read transaction of SQLite's online backup API, so the copy
    is the store as of one commit, WAL included. The copy is a single file (rollback
    journal mode); checked before it replaces ``out``."""
    src_path = Path(data_dir) / DB_FILE
    if not src_path.is_file():
        raise BackupError(f"no store to back up: {src_path} does not exist")
    out = Path(out)
    live = src_path.resolve()
    if out.resolve().parent == live.parent and out.name.startswith(DB_FILE):
        raise BackupError(f"{out} is among the store's own files: write the backup elsewhere")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        src = sqlite3.connect(src_path, timeout=30)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)  # pages=-1: all in one step, one consistent snapshot
                dst.execute("PRAGMA journal_mode=DELETE")
            finally:
                dst.close()
        finally:
            src.close()
        summary = check(tmp)
        _fsync(tmp)
        os.replace(tmp, out)
        _fsync(out.parent)
    except sqlite3.Error as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"cannot back up {src_path} to {out}: {exc}") from exc
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"cannot write {out}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Summary(out, summary.size, summary.messages, summary.twins)


def check(path: str | Path) -> Summary:
    """``PRAGMA integrity_check`` and the store's tables; NotABackup says what is wrong.
    Opened read-write (only our own copies are checked): closing it then removes the
    ``-wal`` and ``-shm`` files that opening a WAL-mode copy creates."""
    path = Path(path)
    if not path.is_file():
        raise NotABackup(f"{path} is not a file")
    try:
        db = sqlite3.connect(path)
        try:
            problems = [row[0] for row in db.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise NotABackup(f"{path} is damaged: {'; '.join(problems[:5])}")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            missing = [t for t in REQUIRED_TABLES if t not in tables]
            if missing:
                raise NotABackup(
                    f"{path} is not a chargewatch store (no table {', '.join(missing)})"
                )
            messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
            twins = db.execute("SELECT count(*) FROM twins").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise NotABackup(f"{path} is not a sound SQLite store: {exc}") from exc
    return Summary(path, path.stat().st_size, messages, twins)


def restore(data_dir: str | Path, file: str | Path, *, now: datetime | None = None) -> Summary:
    """Put the backup ``file`` in place as the data dir's store, with no service running on
    it (its lock is held throughout, so none can start meanwhile). The copy is checked
    where it will live before anything is replaced; the current store (with its WAL, if a
    crash left one) is renamed aside, never deleted."""
    data_dir = Path(data_dir)
    file = Path(file)
    if not file.is_file():
        raise NotABackup(f"{file} is not a file")
    wal = Path(f"{file}-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        # a raw copy of a live store: its last commits are in the WAL, which is not copied
        raise NotABackup(
            f"{file} has a WAL beside it ({wal}) holding commits the file lacks: take"
            " backups with `chargewatch backup`, or checkpoint it first"
            f" (sqlite3 {file} 'PRAGMA wal_checkpoint(TRUNCATE)')"
        )
    with DataDirLock(data_dir):
        target = data_dir / DB_FILE
        incoming = data_dir / f".{DB_FILE}.restoring"
        try:
            _copy(file, incoming)
            checked = check(incoming)
            stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
            aside = data_dir / f"{DB_FILE}.replaced-{stamp}"
            kept: Path | None = None
            if target.exists():
                for suffix in ("-wal", "-shm", ""):  # the database file last
                    current = Path(f"{target}{suffix}")
                    if current.exists():
                        os.replace(current, Path(f"{aside}{suffix}"))
                kept = aside
            os.replace(incoming, target)
            _fsync(data_dir)
        except OSError as exc:
            raise BackupError(f"cannot restore {file} into {data_dir}: {exc}") from exc
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{incoming}{suffix}").unlink(missing_ok=True)
    return Summary(target, checked.size, checked.messages, checked.twins, kept)


def _copy(src: Path, dst: Path) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as out, open(src, "rb") as inp:
        while chunk := inp.read(1 << 20):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
