"""Retained replays of dead letters: a retained message the broker replays on every
subscribe is recognised by its digest of (topic, size, payload kept) and counted instead of
stored again. The digests of the newest ``kept`` dead letters are held in memory (loaded
from the store at start); both state stores use this."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence

from ingest.store import DeadLetter

Sorted = tuple[list[tuple[DeadLetter, bytes]], list[bytes]]


def digest(d: DeadLetter) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in (str(d.topic).encode(), b"\0", str(d.size).encode(), b"\0", d.payload):
        h.update(part)
    return h.digest()


class RetainedReplays:
    def __init__(self, kept: int, known_oldest_first: Iterable[bytes]) -> None:
        self.kept = kept
        self._known: dict[bytes, None] = dict.fromkeys(known_oldest_first)  # insertion-ordered
        self._lock = threading.Lock()
        self.repeats = 0  # retained replays of dead letters, since this start

    def sort_out(self, dead_letters: Sequence[DeadLetter]) -> Sorted:
        """(new dead letters with their digests, digests of retained replays of known ones).
        Only a retained delivery can be a replay: the same bytes sent again live are a new
        message, and a new dead letter."""
        fresh: list[tuple[DeadLetter, bytes]] = []
        repeats: list[bytes] = []
        with self._lock:
            batch: set[bytes] = set()
            for d in dead_letters:
                key = digest(d)
                if d.retained and (key in self._known or key in batch):
                    repeats.append(key)
                else:
                    fresh.append((d, key))
                    batch.add(key)
        return fresh, repeats

    def remember(self, fresh: list[tuple[DeadLetter, bytes]], repeats: list[bytes]) -> None:
        """After the commit (a failed write is retried, and must sort the same way)."""
        if not fresh and not repeats:
            return
        with self._lock:
            for _, key in fresh:
                self._known.pop(key, None)
                self._known[key] = None
            while len(self._known) > self.kept:
                del self._known[next(iter(self._known))]
            self.repeats += len(repeats)
