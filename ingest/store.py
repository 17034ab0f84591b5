"""What the stores keep, and the small protocols every backend implements.

History (append-only): every accepted message, idempotent on (device, boot, seq, type) so a
redelivery is stored once. State: device twins and dead letters. ``append``/``save`` return
only once the data is durable; the ingestor acknowledges messages to the broker after that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from devices.contract import Message

MessageType = Literal["birth", "death", "status", "event"]
DEAD_LETTER_PAYLOAD_KEPT = 16 * 1024


class HistoryRow(NamedTuple):
    """One stored message. A named tuple: ingest makes one per message, and the first nine
    fields are the embedded store's columns, in this order."""

    device_id: str
    station_id: str
    kind: str
    type: MessageType
    boot: str
    seq: int
    ts_ms: int  # device clock; a death has none, so it is our arrival time
    received_ms: int  # our clock
    payload: str  # the JSON text as received
    message: Message  # decoded, for backends that derive fields from it


@dataclass(frozen=True, slots=True)
class DeadLetter:
    received_ms: int
    topic: str
    reason: str
    detail: str
    payload: bytes  # the first DEAD_LETTER_PAYLOAD_KEPT bytes
    size: int  # the whole payload's size
    id: int | None = None
    # delivered as a retained message (on a subscribe): a replay of what the broker keeps,
    # which a store may recognise as already dead-lettered (every restart replays it)
    retained: bool = False

    @classmethod
    def of(
        cls,
        received_ms: int,
        topic: str,
        reason: str,
        detail: str,
        payload: bytes,
        *,
        retained: bool = False,
    ) -> DeadLetter:
        excerpt = payload[:DEAD_LETTER_PAYLOAD_KEPT]
        return cls(received_ms, topic, reason, detail, excerpt, len(payload), retained=retained)


class HistoryStore(Protocol):
    def append(self, rows: Sequence[HistoryRow]) -> None:
        """Store rows durably; rows already stored are skipped. Raises StoreUnavailable."""

    def messages(
        self,
        device_id: str,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Stored messages of one device by device time, oldest first."""

    def status_samples(
        self, device_ids: Sequence[str], since_ms: int, until_ms: int, every_ms: int
    ) -> list[dict[str, Any]]:
        """Statuses downsampled in the store: for each device and each ``every_ms`` bucket of
        device time (aligned to the epoch) in [since_ms, until_ms), the last status in the
        bucket (highest device time, then seq) as ``{device_id, bucket_ms, payload}``.
        Ordered by device, then bucket."""

    def happenings(
        self,
        device_ids: Sequence[str],
        since_ms: int,
        until_ms: int,
        limit: int = 100_000,
    ) -> list[dict[str, Any]]:
        """Everything but statuses (births, deaths, events) of the devices in
        [since_ms, until_ms) of device time, oldest first, each stored once, as
        ``{device_id, type, ts_ms, payload}``."""

    def close(self) -> None: ...


@runtime_checkable
class RollupStore(Protocol):
    """A history store that keeps hourly rollups (ingest.rollups; the embedded store)."""

    def rolled_through(self) -> int | None:
        """Every hour before this (epoch ms) is rolled up (None: none yet)."""

    def rollups(
        self, scope: str, ids: Sequence[str], since_ms: int, until_ms: int
    ) -> list[dict[str, Any]]:
        """Rollups (``scope`` "device" or "station") of the hours starting in
        [since_ms, until_ms), by id then hour, as ``{id, hour_ms, data}``."""


class TwinRecord(NamedTuple):
    device_id: str
    data: bytes  # the twin as a JSON object (ingest.twins.Twin.encode)


class Unobserved(NamedTuple):
    """An applied event, journaled with its batch until its alert effects are durable."""

    id: int
    device_id: str
    received_ms: int
    payload: str  # the event as JSON (the contract's shape, ts in epoch ms)


class StateStore(Protocol):
    def save(
        self,
        twins: Sequence[TwinRecord],
        dead_letters: Sequence[DeadLetter],
        unobserved: Sequence[Unobserved] = (),
    ) -> None:
        """Upsert twin records, append dead letters and journal events, durably."""

    def load_twins(self) -> list[dict[str, Any]]: ...

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    def dead_letter_counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchStore(Protocol):
    """A store keeping both history and state (the embedded SQLite one): it writes a batch
    in one transaction, so history is never on disk without the twins it made."""

    def write(
        self,
        rows: Sequence[HistoryRow],
        twins: Sequence[TwinRecord],
        dead_letters: Sequence[DeadLetter],
        unobserved: Sequence[Unobserved] = (),
    ) -> None:
        """``append`` and ``save`` of one batch, together or not at all, durably."""
