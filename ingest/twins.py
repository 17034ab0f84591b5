"""Device twins: the current state of every device, and the ordering rules that guard it.

Pure: no I/O. ``Twin.apply`` takes one decoded message and says what it did (``Outcome``).

Ordering, per device (contract v1, "How the service must read this"):

- a message whose (boot, seq) is not newer than the last applied one *of the same channel*
  changes nothing; an exact repeat is a duplicate. Births/deaths (``state``) and snapshots
  (``status``) are ordered separately because a broker hands out retained messages of
  different topics in any order: a retained status may arrive before the retained birth that
  preceded it, and must not make that birth look old.
- a boot we have not seen starts a new sequence; the boots it replaced are remembered, and
  late messages of those are out of order. A retired boot that goes on (two messages in a row
  above everything it sent before, not retained, nothing of the current boot in between) is
  the live one again: one message with a strange boot (forged, or a firmware glitch) must not
  freeze the real device out until it reboots (``boots_revived``).
- a death applies only to the connection it names: same boot, and ``seq`` not older than the
  latest birth of that boot. A late Will of an older connection is ignored, and so is one
  whose ``seq`` is further past the sequence than a gap may be (it names no connection).
- a death is disproved by a live message: a status or event of the same boot, newer than
  everything seen when the death applied and not retained, brings the device online again
  (counted in ``wills_disproved``). A forged Will cannot keep a talking device offline.
- a gap in ``seq`` counts lost messages; a late message that fills the gap un-counts it.
- a (boot, seq) already stored (applied or not) is a duplicate, however late it comes: the
  last ``RECENT_SEQS_KEPT`` (at least) of a boot are remembered, so a QoS 1 redelivery after newer
  messages is counted once, not as out of order.
- a jump leaving more than ``SEQ_JUMP_MAX`` seqs missing is held (stored, not applied,
  nothing counted lost): one forged or corrupt seq must not freeze the real device out. The
  next message that continues from the held one (missing at most ``SEQ_JUMP_MAX`` after it) confirms
  it: the sequence resets there, counted as a reset, not as lost messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgspec

from devices.availability import is_online
from devices.catalog import DEFAULT_RELEASE_SOC, Device
from devices.contract import (
    CLOCK_SKEW_MAX_MS,
    DEFAULT_HEARTBEAT_S,
    SEQ_MAX,
    Birth,
    CabinetStatus,
    Death,
    Event,
    Message,
    PileStatus,
    Status,
)

RETIRED_BOOTS_KEPT = 8
RECENT_SEQS_KEPT = 64  # at least, per boot: a redelivery comes within the in-flight window
RECENT_EVENTS_KEPT = 64  # and of events alone: a late repeat must not raise an alert again
SEQ_JUMP_MAX = 128  # seqs missing in one gap; a larger jump is held until the device goes on
MISSING_SEQS_KEPT = 256  # the newest seqs of gaps, so that a late arrival can be un-counted

_ENCODER = msgspec.json.Encoder()
_STATUSES = (PileStatus, CabinetStatus)  # a tuple: a union is built per call, checked slower


class Outcome(StrEnum):
    APPLIED = "applied"  # changed current state (or, for events, was new)
    DUPLICATE = "duplicate"  # same (boot, seq) as one already applied
    OUT_OF_ORDER = "out_of_order"  # older than what is applied: kept in history only
    STALE_DEATH = "stale_death"  # a Will of an older connection: ignored
    SEQ_JUMP = "seq_jump"  # seq far past the highest seen: kept in history, held until confirmed


class CountMismatch(Exception):
    """A status whose port/slot count differs from the birth (the contract rejects it)."""


@dataclass
class Twin:
    device_id: str
    kind: str
    station_id: str
    units: int  # ports/slots per the catalog: the authority (a birth that differs is rejected)
    release_soc: float
    boot: str | None = None
    max_seq: int = -1  # highest seq seen in this boot (all channels)
    state_seq: int = -1  # seq of the last applied birth/death
    status_seq: int = -1  # seq of the last applied status
    birth_seq: int | None = None
    online_flag: bool = False
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    model: str | None = None
    firmware: str | None = None
    status: Status | None = None
    status_ts_ms: int | None = None  # device clock of the status
    last_seen_ms: int | None = None  # our clock: last message that showed the device alive
    changed_ms: int | None = None  # our clock: last change of current state
    online_since_ms: int | None = None
    retired_boots: list[str] = field(default_factory=list)
    # per retired boot: its highest seq and its birth's seq (-1: none) when it was retired
    retired_max_seqs: list[int] = field(default_factory=list)
    retired_birth_seqs: list[int] = field(default_factory=list)
    revive_boot: str | None = None  # a retired boot that sent a message above its max...
    revive_seq: int = -1  # ... with this seq: if its next message goes on, it is alive
    recent_seqs: list[int] = field(default_factory=list)  # stored seqs of this boot (newest)
    recent_event_seqs: list[int] = field(default_factory=list)  # to spot repeated events
    missing_seqs: list[int] = field(default_factory=list)  # seqs counted as lost (newest)
    held_seq: int | None = None  # a jump past SEQ_JUMP_MAX, until a message continues from it
    will_seq: int | None = None  # highest seq seen when the applied death did: newer disproves
    lost_messages: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    reboots: int = 0
    seq_jumps: int = 0  # messages held for a seq jump
    seq_resets: int = 0  # held jumps the device continued from
    wills_disproved: int = 0  # deaths a live message of the same connection overruled
    clock_skewed: int = 0  # messages whose ts was off our clock (kept as sent, counted)
    boots_revived: int = 0  # retired boots that went on: the boot that replaced them was not

    @classmethod
    def for_device(cls, device: Device, release_soc: float = DEFAULT_RELEASE_SOC) -> Twin:
        return cls(
            device_id=device.id,
            kind=device.kind,
            station_id=device.station_id,
            units=device.spec.units,
            release_soc=device.spec.release_soc or release_soc,
        )

    def online(self, now_ms: int) -> bool:
        return is_online(self.online_flag, self.last_seen_ms, self.heartbeat_s, now_ms)

    # -- applying messages -------------------------------------------------------------

    def apply(self, msg: Message, arrival_ms: int, *, retained: bool = False) -> Outcome:
        """Apply one decoded message received at ``arrival_ms`` (our clock).

        A retained message may be old: it proves the device was alive no later than its own
        ``ts``, so it refreshes ``last_seen`` only up to that.
        """
        if isinstance(msg, Death):
            return self._apply_death(msg, arrival_ms)
        if msg.boot != self.boot:
            if msg.boot in self.retired_boots:
                if not self._revives(msg, arrival_ms, retained):
                    self.out_of_order += 1
                    return Outcome.OUT_OF_ORDER
            else:
                self._new_boot(msg.boot)
        elif self.revive_boot is not None and not retained:
            self.revive_boot = None  # the current boot spoke: the retired one must start over
        outcome = self._sequence(msg)
        if outcome is Outcome.DUPLICATE:
            return outcome
        ts = msg.ts
        if not arrival_ms - CLOCK_SKEW_MAX_MS <= ts <= arrival_ms + CLOCK_SKEW_MAX_MS and (
            ts > arrival_ms or not retained  # inline: clock_skewed(), once per message
        ):
            self.clock_skewed += 1
        if outcome is not Outcome.APPLIED:
            return outcome
        seen = min(arrival_ms, msg.ts) if retained else arrival_ms
        if self.last_seen_ms is None or seen > self.last_seen_ms:
            self.last_seen_ms = seen
        if isinstance(msg, Birth):
            self.state_seq = msg.seq
            self.birth_seq = msg.seq
            if not self.online_flag:
                self.online_since_ms = seen
            self.online_flag = True
            self.heartbeat_s = msg.heartbeat_s
            self.model, self.firmware = msg.model, msg.firmware
            self.will_seq = None
            self.changed_ms = arrival_ms
            return Outcome.APPLIED
        if isinstance(msg, _STATUSES):
            self.status_seq = msg.seq
            self.status = msg
            self.status_ts_ms = msg.ts
            self.changed_ms = arrival_ms
        if self.will_seq is not None and msg.seq > self.will_seq and not retained:
            self._disprove_will(seen, arrival_ms)
        return Outcome.APPLIED

    def _disprove_will(self, seen: int, arrival_ms: int) -> None:
        """A message sent after everything we had when the Will applied: the connection the
        Will named is alive (or a later one is, whose birth we missed)."""
        self.will_seq = None
        if self.online_flag or self.birth_seq is None:
            return  # a boot with no birth yet stays offline until its birth (Sparkplug)
        self.online_flag = True
        self.online_since_ms = seen
        self.wills_disproved += 1
        self.changed_ms = arrival_ms

    def check_count(self, status: Status) -> None:
        """Raise CountMismatch when ``status`` lists another number of ports/slots."""
        if len(status.units) != self.units:
            what = "ports" if self.kind == "pile" else "slots"
            raise CountMismatch(f"{len(status.units)} {what} listed, the device has {self.units}")

    def _sequence(self, msg: Birth | PileStatus | CabinetStatus | Event) -> Outcome:
        seq = msg.seq
        if seq > self.max_seq:  # the common case: new (unless a held jump comes again)
            if self.held_seq is not None and seq in self.recent_seqs:
                self.duplicates += 1
                return Outcome.DUPLICATE
            if self.max_seq >= 0 and seq - self.max_seq - 1 > SEQ_JUMP_MAX:
                held = self.held_seq
                if held is None or not held < seq <= held + 1 + SEQ_JUMP_MAX:
                    self.held_seq = seq
                    self.seq_jumps += 1
                    self._remember(seq)
                    return Outcome.SEQ_JUMP
                self.held_seq = None  # the device goes on from the jump: a new sequence
                self.seq_resets += 1
                self.missing_seqs.clear()
            elif self.max_seq >= 0:
                self.lost_messages += seq - self.max_seq - 1
                first = max(self.max_seq + 1, seq - MISSING_SEQS_KEPT)
                self.missing_seqs.extend(range(first, seq))
                del self.missing_seqs[:-MISSING_SEQS_KEPT]
            self.max_seq = seq
        else:
            if seq in self.recent_seqs or (
                isinstance(msg, Event) and seq in self.recent_event_seqs
            ):  # stored already: a redelivery, however late
                self.duplicates += 1
                return Outcome.DUPLICATE
            if isinstance(msg, Birth):
                last = self.state_seq
            elif isinstance(msg, Event):
                last = -1  # events carry no state: a late one is new, and kept
            else:
                last = self.status_seq
            if seq == last:  # the last of its kind, remembered past the recent window
                self.duplicates += 1
                return Outcome.DUPLICATE
            if seq in self.missing_seqs:  # it was late, not lost (a redelivery was neither)
                self.missing_seqs.remove(seq)
                self.lost_messages -= 1
            if seq < last:
                self.out_of_order += 1
                self._remember(seq)
                return Outcome.OUT_OF_ORDER
        if isinstance(msg, Event):
            events = self.recent_event_seqs
            events.append(seq)
            if len(events) > 2 * RECENT_EVENTS_KEPT:  # trimmed in steps: cheaper per message
                del events[:-RECENT_EVENTS_KEPT]
        recent = self.recent_seqs  # _remember, inline: this runs for every message
        recent.append(seq)
        if len(recent) > 2 * RECENT_SEQS_KEPT:
            del recent[:-RECENT_SEQS_KEPT]
        return Outcome.APPLIED

    def _remember(self, seq: int) -> None:
        recent = self.recent_seqs
        recent.append(seq)
        if len(recent) > 2 * RECENT_SEQS_KEPT:  # trimmed in steps: cheaper per message
            del recent[:-RECENT_SEQS_KEPT]

    def _apply_death(self, msg: Death, arrival_ms: int) -> Outcome:
        if self.boot is not None and msg.boot != self.boot:
            return Outcome.STALE_DEATH  # an older boot's Will, or one we cannot place
        if self.birth_seq is not None and msg.seq < self.birth_seq:
            return Outcome.STALE_DEATH  # the Will of a connection that has been replaced
        if self.max_seq >= 0 and msg.seq - self.max_seq - 1 > SEQ_JUMP_MAX:
            return Outcome.STALE_DEATH  # names no connection we could have missed the birth of
        if not self.online_flag and self.state_seq == msg.seq and self.boot == msg.boot:
            self.duplicates += 1
            return Outcome.DUPLICATE
        if self.boot is None:
            self.boot = msg.boot
        self.will_seq = self.max_seq
        self.online_flag = False
        self.state_seq = max(self.state_seq, msg.seq)
        self.changed_ms = arrival_ms
        return Outcome.APPLIED

    def _revives(self, msg: Birth | Status | Event, arrival_ms: int, retained: bool) -> bool:
        """Whether ``msg`` of a retired boot shows that boot alive (and makes it current): the
        second message in a row above everything the boot sent before it was retired."""
        i = self.retired_boots.index(msg.boot)
        if retained:
            return False  # the broker's copy proves nothing
        if msg.seq <= self.retired_max_seqs[i]:
            self.revive_boot = None  # a late message: not two live ones in a row
            return False
        held = self.revive_seq
        if self.revive_boot != msg.boot or not held < msg.seq <= held + 1 + SEQ_JUMP_MAX:
            self.revive_boot, self.revive_seq = msg.boot, msg.seq
            return False
        self.retired_boots.pop(i)
        max_seq, birth_seq = self.retired_max_seqs.pop(i), self.retired_birth_seqs.pop(i)
        self._retire_current()
        self.boot = msg.boot
        if held - max_seq - 1 <= SEQ_JUMP_MAX:
            self.lost_messages += held - max_seq - 1
        self.max_seq = held  # the held message was stored (out of order): it is in sequence
        self.state_seq = self.status_seq = max_seq  # older messages of the boot stay old
        self.birth_seq = birth_seq if birth_seq >= 0 else None
        self.online_flag = self.birth_seq is not None
        if self.online_flag:
            self.online_since_ms = arrival_ms
        self.recent_seqs = [held]
        self.recent_event_seqs = []
        self.missing_seqs = []
        self.held_seq = self.will_seq = self.revive_boot = None
        self.boots_revived += 1
        return True

    def _retire_current(self) -> None:
        if self.boot is None:
            return
        self.retired_boots.append(self.boot)
        self.retired_max_seqs.append(self.max_seq)
        self.retired_birth_seqs.append(-1 if self.birth_seq is None else self.birth_seq)
        del self.retired_boots[:-RETIRED_BOOTS_KEPT]
        del self.retired_max_seqs[:-RETIRED_BOOTS_KEPT]
        del self.retired_birth_seqs[:-RETIRED_BOOTS_KEPT]

    def _new_boot(self, boot: str) -> None:
        if self.boot is not None:
            self._retire_current()
            self.reboots += 1
        self.revive_boot = None
        self.boot = boot
        self.max_seq = self.state_seq = self.status_seq = -1
        self.birth_seq = None
        self.online_flag = False  # until this boot's birth arrives
        self.recent_seqs.clear()
        self.recent_event_seqs.clear()
        self.missing_seqs.clear()
        self.held_seq = self.will_seq = None

    # -- persistence -------------------------------------------------------------------

    def encode(self) -> bytes:
        """The twin as JSON (its record), in one call: ~10x building a dict of it."""
        return _ENCODER.encode(self)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = msgspec.json.decode(self.encode())
        return record

    def snapshot(self) -> Twin:
        """A shallow copy, as ``copy.copy`` makes, without its generic machinery."""
        twin = object.__new__(Twin)
        twin.__dict__.update(self.__dict__)
        return twin

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Twin:
        data = dict(record)
        status = data.pop("status", None)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        twin = cls(**known)
        n = len(twin.retired_boots)
        if len(twin.retired_max_seqs) != n or len(twin.retired_birth_seqs) != n:
            # a record from before these were kept: those boots are never revived
            twin.retired_max_seqs, twin.retired_birth_seqs = [SEQ_MAX] * n, [-1] * n
        if status is not None:
            # stored timestamps are epoch ms already; strict models accept them as they are
            twin.status = msgspec.convert(status, Status, strict=True)
        return twin
