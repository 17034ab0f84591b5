"""Station views computed once and shared by every request that wants them, kept per
device and served as ready JSON bytes.

Computing one device's view (estimates included) takes ~50-80 us; the district's 412 took
~30 ms, and recomputing whole stations on the event loop was the rider API's tail. So each
device's view is kept with its ETag part and its JSON, and recomputed only when

- the device changed (``on_change``, the pipeline's post-commit listener),
- it goes stale: at the exact instant its last message is 3 heartbeats old, so a cached view
  never shows a device fresher than it is, or
- it is ``MAX_AGE_MS`` old (what only time changes: ages, countdowns, estimates from the
  district's medians).

Each read also recomputes up to ``REFRESH_PER_READ`` views ahead of need (changed devices
first, then those past a soft age drawn between half and 0.8 of ``MAX_AGE_MS``), so under
load the work is spread over requests instead of coming due all at once in one of them.

A station's counts are summed from its devices' kept views (``DeviceFacts``): when a device
in it goes stale or its oldest view reaches ``MAX_AGE_MS``, and after a change at most every
``REFRESH_MS``. Answers are the kept JSON bytes with the station's ``data_age_s`` (exact for
every answer) and ``distance_m`` spliced in; ETags are computed with the views, the gzipped
station detail is kept until the view or its age changes.

Each device view is kept twice: whole, for maintainer keys, and public (private fields
null, ``api.views.public_device_view``), each with its own JSON and ETag part.
"""

from __future__ import annotations

import gzip
import heapq
import random
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic_core

from api.caching import etag_of_bytes, etag_of_json
from api.live import Trends
from api.views import DeviceFacts, device_facts, device_view, public_device_view, station_summary
from devices.availability import STALE_FACTOR
from devices.catalog import Catalog, StationSpec
from ingest.twins import Twin

REFRESH_MS = 250
"""A changed station is recomputed at most this often: counts are at most this late."""
MAX_AGE_MS = 1000
"""A device view is recomputed at least this often: ages and countdowns at most this old."""
GZIP_LEVEL = 6
"""A station with its devices is ~190 KB of JSON that compresses ~35x; level 6 takes 0.7 ms
where Starlette's 9 took 2.5 ms (and a thread hop) for every request."""
REFRESH_PER_READ = 3
"""Device views recomputed ahead of need on each read (spreads the work over requests)."""
_NEVER = 2**62

# placeholders for what each answer fills in; a catalog string would have to be exactly this
_AGE = "\x00cw:data_age_s\x00"
_DISTANCE = "\x00cw:distance_m\x00"
_HOLES = re.compile(rb'"\\u0000cw:(data_age_s|distance_m)\\u0000"')


@dataclass(frozen=True, slots=True)
class _Device:
    view: dict[str, Any]  # shared, never mutated
    facts: DeviceFacts
    json: bytes
    tag: bytes  # ETag material: the view without ages and countdowns
    public_json: bytes  # the view without its private fields
    public_tag: bytes
    due_ms: int  # recompute before answering at or after this (stale flip, MAX_AGE_MS)
    soft_ms: int  # recompute ahead of need after this (``REFRESH_PER_READ``)
    flips_ms: int  # when it goes stale without a message (or _NEVER)


@dataclass(frozen=True, slots=True)
class Template:
    """JSON bytes with holes for ``data_age_s`` and ``distance_m``."""

    parts: tuple[bytes, ...]
    holes: tuple[str, ...]  # "data_age_s" / "distance_m", between the parts

    @classmethod
    def of(cls, data: bytes) -> Template:
        """``data``: JSON with the placeholders ``_AGE`` and ``_DISTANCE`` as values."""
        pieces = _HOLES.split(data)
        return cls(tuple(pieces[0::2]), tuple(p.decode() for p in pieces[1::2]))

    def fill(self, data_age_s: float | None, distance_m: float | None = None) -> bytes:
        values = {
            "data_age_s": pydantic_core.to_json(data_age_s),
            "distance_m": pydantic_core.to_json(distance_m),
        }
        out = [self.parts[0]]
        for hole, part in zip(self.holes, self.parts[1:], strict=True):
            out += (values[hole], part)
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class _Station:
    computed_ms: int
    due_ms: int  # look at its devices again at or after this
    summary: dict[str, Any]  # without "devices"; shared, never mutated
    devices: tuple[dict[str, Any], ...]  # shared, never mutated
    updated_ms: int | None
    last_updated_ms: int | None
    etag: str  # of the view with its devices (station detail), whole
    public_etag: str  # of the same without the devices' private fields
    summary_etag: str  # of the view without devices (one station in the list)
    summary_json: Template  # holes: distance_m, data_age_s
    device_json: tuple[bytes, ...]
    public_device_json: tuple[bytes, ...]

    def detail_json(self, now_ms: int, *, public: bool) -> bytes:
        """The view with its devices (``distance_m`` null), as ``to_json`` would write it:
        the summary's JSON, then the devices' own JSON joined (``devices`` is the last key).
        Built per answer: most answers are lists, which do not need it. ``public``: the
        devices' private fields null."""
        summary = self.summary_json.fill(self.data_age_s(now_ms), None)
        devices = self.public_device_json if public else self.device_json
        return b"".join([summary[:-1], b',"devices":[', b",".join(devices), b"]}"])

    def data_age_s(self, now_ms: int) -> float | None:
        if self.updated_ms is None:
            return None
        return round(max(0, now_ms - self.updated_ms) / 1000, 1)


@dataclass(frozen=True, slots=True)
class Snapshot:
    view: dict[str, Any]  # a copy: the caller may add to it; "devices" is shared
    etag: str
    summary_etag: str


class StationViews:
    def __init__(
        self,
        catalog: Catalog,
        twins: Mapping[str, Twin],
        trends: Trends,
        flagged: Collection[str] = frozenset(),
    ) -> None:
        self.catalog = catalog
        self.twins = twins
        self.trends = trends
        # serials of flagged packs (ingest.passports, kept live): never counted ready;
        # ``on_flag_change`` recomputes the cabinet of a pack flagged or cleared
        self.flagged = flagged
        self._devices: dict[str, _Device] = {}
        self._stations: dict[str, _Station] = {}
        self._dirty: dict[str, None] = {}  # devices changed since their view (in order)
        self._changed: set[str] = set()  # stations with devices newer than their view
        self._soon: list[tuple[int, str]] = []  # (soft due, device id), a heap
        self._random = random.Random()
        self._gzipped: dict[tuple[str, bool], tuple[_Station, float | None, bytes]] = {}
        self.device_computations = 0  # views computed (tests, and the bench's profile)

    def on_flag_change(self, device_id: str) -> None:
        """Battery passports: a pack in this cabinet was flagged or cleared."""
        twin = self.twins.get(device_id)
        if twin is not None:
            self.on_change([twin])

    def on_change(self, twins: list[Twin]) -> None:
        """Pipeline listener: these devices changed."""
        for t in twins:
            self._dirty[t.device_id] = None
            self._changed.add(t.station_id)

    # -- reading -------------------------------------------------------------------------

    def station(self, station_id: str, now_ms: int, *, fresh: bool = False) -> _Station:
        """The station's kept view, brought up to date for ``now_ms``. ``fresh``: a changed
        station is recomputed now, not after ``REFRESH_MS`` (for the SSE streams, woken once
        per change; the first one recomputes, the rest share it)."""
        self._refresh_some(now_ms)
        entry = self._stations.get(station_id)
        if entry is None or self._outdated(station_id, entry, now_ms, fresh=fresh):
            entry = self._compute(self.catalog.stations[station_id], now_ms)
        return entry

    def detail_gzip(self, entry: _Station, now_ms: int, *, public: bool) -> bytes:
        """``entry``'s station detail gzipped, compressed again only when the view or its
        age (in tenths of a second) changed: browsers ask for gzip, and compressing the
        answer for every request cost more than everything else in it."""
        key = (entry.summary["id"], public)
        age = entry.data_age_s(now_ms)
        kept = self._gzipped.get(key)
        if kept is not None and kept[0] is entry and kept[1] == age:
            return kept[2]
        data = gzip.compress(entry.detail_json(now_ms, public=public), GZIP_LEVEL, mtime=0)
        self._gzipped[key] = (entry, age, data)
        return data

    def _outdated(self, station_id: str, entry: _Station, now_ms: int, *, fresh: bool) -> bool:
        """A device in it went stale or is too old, or one changed (after ``REFRESH_MS``)."""
        if now_ms >= entry.due_ms:
            return True
        return station_id in self._changed and (fresh or now_ms - entry.computed_ms >= REFRESH_MS)

    def get(self, station_id: str, now_ms: int, *, fresh: bool = False) -> Snapshot:
        """The station's view (``devices`` included, shared read-only) and its ETags."""
        entry = self.station(station_id, now_ms, fresh=fresh)
        out = dict(entry.summary)
        out["data_age_s"] = entry.data_age_s(now_ms)
        out["devices"] = list(entry.devices)
        return Snapshot(out, entry.etag, entry.summary_etag)

    # -- computing -----------------------------------------------------------------------

    def _refresh_some(self, now_ms: int) -> None:
        """A few device views recomputed ahead of need on every read: changed devices first,
        then those past their soft due time, oldest first. Spread this way, the work never
        piles up into one request (it did: every station due in the same 250 ms)."""
        done = 0
        while done < REFRESH_PER_READ and self._dirty:
            self._recompute(self.twins[next(iter(self._dirty))], now_ms)
            done += 1
        while done < REFRESH_PER_READ and self._soon and self._soon[0][0] <= now_ms:
            soft, device_id = heapq.heappop(self._soon)
            entry = self._devices.get(device_id)
            if entry is not None and entry.soft_ms == soft:  # else recomputed since
                self._recompute(self.twins[device_id], now_ms)
                done += 1

    def _device(self, twin: Twin, now_ms: int) -> _Device:
        """The device's kept view, recomputed if it changed, went stale or is too old."""
        entry = self._devices.get(twin.device_id)
        if entry is None or now_ms >= entry.due_ms or twin.device_id in self._dirty:
            entry = self._recompute(twin, now_ms)
        return entry

    def _recompute(self, twin: Twin, now_ms: int) -> _Device:
        self._dirty.pop(twin.device_id, None)
        self._changed.add(twin.station_id)
        self.device_computations += 1
        view = device_view(twin, now_ms, self.trends, self.flagged)
        data = pydantic_core.to_json(view)
        public = pydantic_core.to_json(public_device_view(view))
        flips = _NEVER
        if view["online"] and twin.last_seen_ms is not None:
            flips = twin.last_seen_ms + STALE_FACTOR * twin.heartbeat_s * 1000
        soft = now_ms + int(MAX_AGE_MS * self._random.uniform(0.5, 0.8))
        entry = _Device(
            view=view,
            facts=device_facts(twin, view, now_ms, self.flagged),
            json=data,
            tag=etag_of_json(data).encode(),
            public_json=public,
            public_tag=etag_of_json(public).encode(),
            due_ms=min(flips, now_ms + MAX_AGE_MS),
            soft_ms=soft,
            flips_ms=flips,
        )
        self._devices[twin.device_id] = entry
        heapq.heappush(self._soon, (soft, twin.device_id))
        return entry

    def _compute(self, station: StationSpec, now_ms: int) -> _Station:
        devices = [self._device(self.twins[spec.id], now_ms) for spec in station.devices]
        summary = station_summary(station, [d.facts for d in devices], now_ms)
        # the summary's JSON with holes; the age left out of the ETag, distance_m a constant
        summary_json = pydantic_core.to_json(
            {**summary, "distance_m": _DISTANCE, "data_age_s": _AGE}
        )
        summary_etag = etag_of_json(summary_json)
        etag = etag_of_bytes(b";".join([summary_etag.encode(), *(d.tag for d in devices)]))
        public_etag = etag_of_bytes(
            b";".join([summary_etag.encode(), b"public", *(d.public_tag for d in devices)])
        )
        due = min((d.due_ms for d in devices), default=_NEVER)
        updated = max(
            (d.facts.last_seen_ms for d in devices if d.facts.last_seen_ms is not None),
            default=None,
        )
        last_updated = max(
            (d.facts.last_updated_ms for d in devices if d.facts.last_updated_ms is not None),
            default=None,
        )
        entry = _Station(
            computed_ms=now_ms,
            due_ms=due,
            summary=summary,
            devices=tuple(d.view for d in devices),
            updated_ms=updated,
            last_updated_ms=last_updated,
            etag=etag,
            public_etag=public_etag,
            summary_etag=summary_etag,
            summary_json=Template.of(summary_json),
            device_json=tuple(d.json for d in devices),
            public_device_json=tuple(d.public_json for d in devices),
        )
        self._stations[station.id] = entry
        self._changed.discard(station.id)
        return entry
