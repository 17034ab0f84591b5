"""One message's way: topic -> decode/validate -> order/dedupe -> twin -> store -> ack.

Messages are handled in batches: whatever has arrived (up to ``batch_max``) is applied to
the twins, written to the stores in one transaction, and only then acknowledged. A message
that breaks the contract becomes a dead letter (written in the same batch) and is
acknowledged too, so it frees its in-flight slot. A failing store is retried with capped,
jittered backoff and nothing is acknowledged meanwhile: the broker keeps the messages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import msgspec

from devices.catalog import DEFAULT_RELEASE_SOC, Catalog, Device
from devices.contract import Birth, ContractError, Death, Event, Message, decode, unknown_unit
from devices.topics import Channel, TopicScheme
from ingest import StoreError, StoreUnavailable
from ingest.metrics import IngestMetrics
from ingest.mqtt import Received
from ingest.store import (
    BatchStore,
    DeadLetter,
    HistoryRow,
    HistoryStore,
    MessageType,
    StateStore,
    TwinRecord,
    Unobserved,
)
from ingest.twins import CountMismatch, Outcome, Twin

log = logging.getLogger(__name__)
_new_tuple = tuple.__new__
# a tuple, not ``Death | Event``: that builds a union on every message and checks it at
# twice the cost of a tuple
_NO_KIND = (Death, Event)
_EVENT_JSON = msgspec.json.Encoder()
STOP_WAIT_S = 10.0
"""On a stop, how long the commit in progress (and its observers) may take to finish."""


class Twins:
    """Every catalog device's twin, by id; read by the API, written by the pipeline only."""

    def __init__(self, catalog: Catalog, release_soc: float = DEFAULT_RELEASE_SOC) -> None:
        self.catalog = catalog
        self.release_soc = release_soc
        self.by_id: dict[str, Twin] = {
            d.id: Twin.for_device(d, release_soc) for d in catalog.devices.values()
        }

    def restore(self, records: list[dict[str, object]]) -> int:
        restored = 0
        for record in records:
            device = self.catalog.devices.get(str(record.get("device_id")))
            if device is None:
                continue  # no longer in the catalog
            twin = Twin.from_record(dict(record))
            twin.station_id = device.station_id
            twin.kind, twin.units = device.kind, device.spec.units  # the catalog's, always
            twin.release_soc = device.spec.release_soc or self.release_soc
            self.by_id[device.id] = twin
            restored += 1
        return restored

    def __getitem__(self, device_id: str) -> Twin:
        return self.by_id[device_id]


@dataclass
class Batch:
    """Messages handled together: applied to the twins, written in one transaction, then
    acknowledged. ``run`` makes them; tests and the in-process benchmarks (``bench/``) drive
    the same steps one by one: ``handle`` each message, ``write``, ``commit``."""

    received: list[Received] = field(default_factory=list)
    rows: list[HistoryRow] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    changed: dict[str, Twin] = field(default_factory=dict)
    applied: list[tuple[Twin, Message, int]] = field(default_factory=list)
    unobserved: list[Unobserved] = field(default_factory=list)  # its applied events
    # what happened to the messages, counted into the metrics once per batch: a Prometheus
    # counter takes a lock per increment, and eight of them cost ~10 us a message (plain
    # dicts: incrementing a collections.Counter costs 2.5x dict.get)
    outcomes: dict[Outcome, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    skewed: int = 0  # messages whose device time was off ours


class Pipeline:
    def __init__(
        self,
        *,
        catalog: Catalog,
        scheme: TopicScheme,
        twins: Twins,
        history: HistoryStore,
        state: StateStore,
        metrics: IngestMetrics,
        ack: Callable[[Received], bool],
        batch_max: int = 1000,
        retry_max_s: float = 30.0,
    ) -> None:
        self.catalog = catalog
        self.scheme = scheme
        self.twins = twins
        self.history = history
        self.state = state
        self.metrics = metrics
        self._ack = ack
        self.batch_max = batch_max
        self.retry_max_s = retry_max_s
        # arrived, not yet handled; a deque and an event cost half an asyncio.Queue
        self.queue: collections.deque[Received] = collections.deque()
        self._arrived = asyncio.Event()
        # topic -> (device, channel) of catalog devices: parsed once, never grows past the
        # catalog's devices x channels (an unknown device's topic is parsed every time)
        self._routes: dict[str, tuple[Device, Channel]] = {}
        # Called on the loop after each batch is durable, in arrival order:
        # listeners with the twins whose state changed (SSE, caches);
        # observers with every applied message and a copy of its twin as that message left
        # it (alert rules: a later message of the same batch must not show through).
        self.listeners: list[Callable[[list[Twin]], None]] = []
        self.observers: list[Callable[[Twin, Message, int], None]] = []
        # Set by an observer whose effects become durable after the batch (the alert
        # engine): every applied event is then journaled with its batch, numbered after
        # ``journal_last``, and this is called with the batch's last number once the
        # observers have seen it. Effects never durable are replayed from the journal.
        self.observed_through: Callable[[int], None] | None = None
        self.journal_last = 0
        # one store keeping both (the embedded SQLite one) writes a batch in one transaction
        self._one_store = (
            state if isinstance(state, BatchStore) and state is cast(object, history) else None
        )
        self.store_healthy = True
        self.last_message_ms: int | None = None
        self.unacked = 0  # delivered to us, not yet acknowledged
        metrics.inflight.set_function(lambda: self.unacked)

    def deliver(self, received: Received) -> None:
        """Called on the loop by the MQTT source for every message."""
        self.unacked += 1
        self.queue.append(received)
        self._arrived.set()

    async def run(self) -> None:
        """Handle batch N+1 while batch N is being written (the write runs in a thread and
        mostly outside the GIL). Writes, acks and observers stay in batch order."""
        writing: asyncio.Task[None] | None = None
        try:
            queue = self.queue
            while True:
                while not queue:
                    self._arrived.clear()
                    await self._arrived.wait()
                batch = Batch()
                for _ in range(min(len(queue), self.batch_max)):
                    self.handle(queue.popleft(), batch)
                self._journal(batch)
                # the twins' records now, before the next batch changes them: state must
                # never get ahead of the history written with it
                records = [TwinRecord(d, t.encode()) for d, t in batch.changed.items()]
                if writing is not None:
                    await asyncio.shield(writing)  # a stop waits for it below
                writing = asyncio.create_task(self.commit(batch, records), name="ingest-write")
        finally:
            if writing is not None and not writing.done():
                # a stop: let the commit in progress finish, acknowledge and be observed
                # (cancelled, its thread would still commit, but nothing would be acked or
                # observed); the journal covers a commit that outlasts the wait
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(writing), STOP_WAIT_S)
                if not writing.done():
                    log.warning("stopping with a store write still in progress")
                    writing.cancel()

    def handle(self, r: Received, batch: Batch) -> None:
        """One message; a bug handling it costs that message (a dead letter), not ingest."""
        try:
            self._handle(r, batch)
        except Exception as exc:
            log.exception("handling a message on %s raised", r.topic)
            if not batch.received or batch.received[-1] is not r:
                batch.received.append(r)
            self._reject(batch, r, "internal", f"{type(exc).__name__}: {exc}")

    def _journal(self, batch: Batch) -> None:
        if self.observed_through is None:
            return
        for twin, msg, received_ms in batch.applied:
            if isinstance(msg, Event):
                self.journal_last += 1
                payload = _EVENT_JSON.encode(msg).decode()
                batch.unobserved.append(
                    Unobserved(self.journal_last, twin.device_id, received_ms, payload)
                )

    # -- per message --------------------------------------------------------------------

    def _handle(self, r: Received, batch: Batch) -> None:
        batch.received.append(r)
        self.last_message_ms = r.received_ms
        route = self._routes.get(r.topic)
        if route is None:
            topic = self.scheme.parse(r.topic)
            if topic is None:
                return self._reject(
                    batch,
                    r,
                    "topic",
                    f"{r.topic!r} is outside {self.scheme.prefix}/<device>/<channel>",
                )
            known = self.catalog.devices.get(topic.device_id)
            if known is None:
                return self._reject(
                    batch, r, "unknown_device", f"{topic.device_id!r} is not in the catalog"
                )
            route = self._routes[r.topic] = (known, topic.channel)
        device, channel = route
        if channel == "cmd":
            return None  # service -> device commands: not data
        try:
            msg = decode(channel, r.payload)
        except ContractError as exc:
            return self._reject(batch, r, exc.reason, exc.detail)
        except Exception as exc:  # a bug in decoding: keep the message and go on, loudly
            log.exception("decoding a message on %s raised", r.topic)
            return self._reject(batch, r, "internal", f"{type(exc).__name__}: {exc}")
        twin = self.twins.by_id[device.id]
        if not isinstance(msg, _NO_KIND) and msg.kind != device.kind:
            return self._reject(
                batch, r, "kind_mismatch", f"payload says {msg.kind}, catalog says {device.kind}"
            )
        mtype: MessageType
        if isinstance(msg, Birth):
            mtype = "birth"
            if msg.units != twin.units:  # the catalog's count: the authority, not the device
                what = "ports" if device.kind == "pile" else "slots"
                detail = f"birth says {msg.units} {what}, the catalog says {twin.units}"
                return self._reject(batch, r, "count_mismatch", detail)
        elif isinstance(msg, Death):
            mtype = "death"
        elif isinstance(msg, Event):
            mtype = "event"
            if wrong := unknown_unit(msg, device.kind, twin.units):
                return self._reject(batch, r, "unknown_unit", wrong)
        else:
            mtype = "status"
            try:
                twin.check_count(msg)
            except CountMismatch as exc:
                return self._reject(batch, r, "count_mismatch", str(exc))
        disproved, skewed = twin.wills_disproved, twin.clock_skewed
        outcome = twin.apply(msg, r.received_ms, retained=r.retained)
        if twin.clock_skewed != skewed:
            batch.skewed += 1
        if twin.wills_disproved != disproved:  # rare: count it at once
            self.metrics.wills_disproved.inc()
        batch.accepted[mtype] = batch.accepted.get(mtype, 0) + 1
        batch.outcomes[outcome] = batch.outcomes.get(outcome, 0) + 1
        if outcome is Outcome.DUPLICATE:
            return None  # stored when it was first applied
        if outcome is Outcome.APPLIED:
            batch.changed[device.id] = twin
            if self.observers:  # the twin as this message left it, not as the batch will
                batch.applied.append((twin.snapshot(), msg, r.received_ms))
        batch.rows.append(
            # what HistoryRow(...) makes, in a fifth of its time (its __new__ is Python code)
            _new_tuple(
                HistoryRow,
                (
                    device.id,
                    device.station_id,
                    device.kind,
                    mtype,
                    msg.boot,
                    msg.seq,
                    msg.ts if msg.ts is not None else r.received_ms,  # ts_ms
                    r.received_ms,
                    r.payload.decode("utf-8", errors="replace"),
                    msg,
                ),
            )
        )
        return None

    def _reject(self, batch: Batch, r: Received, reason: str, detail: str) -> None:
        batch.rejected[reason] = batch.rejected.get(reason, 0) + 1
        log.debug("dead letter %s on %s: %s", reason, r.topic, detail)
        batch.dead.append(
            DeadLetter.of(r.received_ms, r.topic, reason, detail, r.payload, retained=r.retained)
        )

    # -- per batch ----------------------------------------------------------------------

    def _count(self, batch: Batch) -> None:
        m = self.metrics
        m.received.inc(len(batch.received))
        if batch.received:
            m.last_message_ts.set(batch.received[-1].received_ms / 1000)
        for mtype, n in batch.accepted.items():
            m.accepted.labels(mtype).inc(n)
        for reason, n in batch.rejected.items():
            m.dead_letters.labels(reason).inc(n)
        if batch.skewed:
            m.clock_skew.inc(batch.skewed)
        for outcome, counter in (
            (Outcome.APPLIED, m.applied),
            (Outcome.DUPLICATE, m.duplicates),
            (Outcome.OUT_OF_ORDER, m.out_of_order),
            (Outcome.STALE_DEATH, m.stale_deaths),
            (Outcome.SEQ_JUMP, m.seq_jumps),
        ):
            if n := batch.outcomes.get(outcome, 0):
                counter.inc(n)

    async def commit(self, batch: Batch, records: list[TwinRecord] | None = None) -> None:
        self._count(batch)
        if records is None:
            records = [TwinRecord(d, t.encode()) for d, t in batch.changed.items()]
        rows, dead = batch.rows, batch.dead
        delay = 0.2
        while True:
            try:
                with self.metrics.write_seconds.time():
                    await asyncio.to_thread(self.write, rows, records, dead, batch.unobserved)
                break
            except StoreUnavailable as exc:
                self._store_failed(exc, delay)
            except StoreError as exc:
                # refused, not unreachable: retrying the same batch would stall ingest for
                # good. Find the rows the store refuses and keep them as dead letters instead.
                self._store_failed(exc, delay)
                if rows:
                    try:
                        rows, refused = await asyncio.to_thread(self._isolate_refused, rows)
                    except StoreUnavailable:
                        refused = []
                    dead = dead + refused
                    if refused:
                        continue
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.retry_max_s)
        if not self.store_healthy:
            log.info("store is back; %d messages written", len(rows))
        self.store_healthy = True
        self.metrics.store_healthy.set(1)
        self.metrics.written.inc(len(rows))  # refused rows went to the dead letters
        done_ms = time.time_ns() // 1_000_000
        acked = sum(1 for r in batch.received if self._ack(r))
        self.metrics.acked.inc(acked)
        self.unacked -= len(batch.received)
        self.metrics.ack_latency.observe_many(
            collections.Counter(max(0, done_ms - r.received_ms) / 1000 for r in batch.received)
        )
        for twin, msg, received_ms in batch.applied:
            for observer in self.observers:
                self._safely(observer, twin, msg, received_ms)
        if batch.unobserved and self.observed_through is not None:
            self._safely(self.observed_through, batch.unobserved[-1].id)
        if batch.changed:
            changed = list(batch.changed.values())
            for listener in self.listeners:
                self._safely(listener, changed)

    def _safely(self, callback: Callable[..., None], *args: object) -> None:
        """A failing observer is logged and counted; it never stops ingest."""
        try:
            callback(*args)
        except Exception:
            self.metrics.observer_errors.inc()
            log.exception("observer %r failed", callback)

    def _store_failed(self, exc: Exception, delay: float) -> None:
        self.metrics.write_errors.inc()
        self.metrics.store_healthy.set(0)
        self.store_healthy = False
        log.error("store write failed (%s); retrying in %.1fs, nothing acked", exc, delay)

    def _isolate_refused(self, rows: list[HistoryRow]) -> tuple[list[HistoryRow], list[DeadLetter]]:
        """Write rows one by one; those the store refuses come back as dead letters."""
        kept: list[HistoryRow] = []
        refused: list[DeadLetter] = []
        for row in rows:
            try:
                self.history.append([row])
                kept.append(row)
            except StoreUnavailable:
                raise
            except StoreError as exc:
                channel = "state" if row.type in ("birth", "death") else row.type
                topic = self.scheme.build(row.device_id, channel)  # type: ignore[arg-type]
                refused.append(
                    DeadLetter.of(
                        row.received_ms, topic, "store_rejected", str(exc), row.payload.encode()
                    )
                )
                self.metrics.dead_letters.labels("store_rejected").inc()
        return kept, refused

    def write(
        self,
        rows: list[HistoryRow],
        records: list[TwinRecord],
        dead: list[DeadLetter],
        unobserved: list[Unobserved],
    ) -> None:
        if self._one_store is not None:
            self._one_store.write(rows, records, dead, unobserved)
            return
        if rows:
            self.history.append(rows)
        if records or dead or unobserved:
            self.state.save(records, dead, unobserved)
