"""Webhook subscriptions and their deliveries (docs/alerts.md, "Delivery").

``Notifier.publish`` runs on the loop and never waits: it makes one ``Delivery`` per
subscription that wants the event, in memory, and hands it to that subscription's outbox.
A delivery is POSTed with ``X-Chargewatch-Signature: sha256=<hex>``, the HMAC-SHA256 of the
exact body with the subscription's secret (plus the robots' own signing for DingTalk and
Feishu), and ``X-Chargewatch-Delivery``, its id, the same on every attempt and increasing
with creation time.

Each subscription's outbox has two lanes (tasks). The *fresh* lane gives every new
delivery its first attempt at once, one at a time in publish order (the next one starts
anyway once an attempt is unanswered for a second, up to four at once). A delivery that failed
in a way worth retrying (timeout, connection error, 5xx, 408, 429, a robot's "too fast")
moves to the *retry* lane: its own capped, jittered exponential backoff, oldest due first.
So a delivery waiting for its retry never holds back a later one; and the first success in
either lane (the receiver is back) makes every waiting delivery due at once, oldest first.
Retries go on until ``deadline_s`` after the notification was raised: then the delivery is
``expired``. A refusal (other 4xx, a robot's error code) is ``failed`` at once; beyond
``queue_max`` waiting, the oldest is ``dropped``. Each of these is logged, counted on the
subscription and listed by ``GET /v1/notifications``. After ``failing_after`` failed
attempts in a row the subscription is marked ``failing``; a success clears the mark.

The outbox is durable, best effort: every change marks the delivery unsaved, and a saver
task upserts unsaved rows, and adds what it counted of each subscription since its last
save (``Subscription.counts_since``, ``store.WebhookCounts``) to the stored record, in one
transaction on a worker thread. Counts saved as increments add up when several notifiers
share a database (the ingest workers): the store lists their sum, and ``failing`` there
counts the failed attempts in a row of all of them since the newest success of any (a
notifier's own ``Subscription`` in memory counts from the stored ones at its start, plus
its own). A stop waits for a save in flight, so no increment is written twice. A store
that cannot write (locked, full) delays only that: the rows stay unsaved and are retried
with backoff, sending goes on. After a restart, pending rows are sent again
under their ids: at least once, dedupe on ``X-Chargewatch-Delivery``. What was never saved
before a crash is lost with the process (logged at a stop).

Subscriptions are added and removed by ``add`` and ``remove`` (serve), or by another
process on the same database (an API replica): ``sync`` then makes the notifier serve the
store's, starting the new ones' lanes and stopping the removed ones' as ``remove`` does
(the ingest workers call it on each NOTIFY of the change: ``ingest.worker_alerts``).

Several writers on one PostgreSQL database (the ingest workers, issue 13) each run one
notifier with ``claim_lease_s`` and an ``IdPool`` of delivery ids (the database's sequence:
time-based ids collide across processes). A delivery is then sent only by the writer that
claims it (``AlertStore.claim_deliveries``): its creator saves it claimed, and renews the
claims of every delivery it keeps (``lease/3``); a claim that runs out (its writer died, or
lost the database for longer than the lease) is taken over by the next writer that claims,
and the writer that could not renew stops sending it. A start resumes nothing by itself: the
pending rows are claimed like any other. A claimed row of a subscription this notifier does
not serve makes it ``sync`` first: one added elsewhere and not heard of yet is sent, only
one removed is ``dropped``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote_plus

import httpx

from devices.catalog import Catalog
from ingest.alerts.config import WebhookOptions
from ingest.alerts.ids import IdPool
from ingest.alerts.messages import DEFAULT_TIMEZONE, LANGUAGES, clip, compose
from ingest.alerts.model import NOTIFIED_EVENTS, Alert, alert_view, rfc3339
from ingest.alerts.store import DELIVERY_COLUMNS, AlertStore, WebhookCounts
from ingest.supervisor import Supervisor

log = logging.getLogger(__name__)

Format = Literal["json", "wecom", "dingtalk", "feishu"]
FORMATS: tuple[str, ...] = ("json", "wecom", "dingtalk", "feishu")
SIGNATURE_HEADER = "X-Chargewatch-Signature"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _retrieved(done: asyncio.Future[Any]) -> None:
    """A done callback that takes a future's outcome (no "never retrieved" warning for one
    whose awaiting was cancelled: the outbox's write, which goes on in its thread)."""
    if not done.cancelled():
        done.exception()


def sign(secret: str, body: bytes) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class Subscription:
    id: int
    url: str
    secret: str
    format: str = "json"
    name: str | None = None
    severities: list[str] = field(default_factory=list)  # empty: all
    stations: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=lambda: list(NOTIFIED_EVENTS))
    language: str | None = None  # "zh" or "en"; None: the `webhooks.language` setting
    created_at_ms: int = 0
    failing: bool = False
    consecutive_failures: int = 0
    delivered: int = 0
    failed: int = 0  # given up: refused, or expired (counted below too)
    expired: int = 0  # retried until the deadline (or the attempts limit)
    dropped: int = 0
    last_error: str | None = None
    last_success_at_ms: int | None = None
    last_failure_at_ms: int | None = None
    pending: int = 0  # deliveries waiting or in flight (not persisted: the outbox knows)

    def wants(self, event: str, alert: Alert) -> bool:
        # an overdue work order escalates: it goes where the alert's escalations go
        wanted = event in self.events or (event == "overdue" and "escalated" in self.events)
        return (
            wanted
            and (not self.severities or alert.severity in self.severities)
            and (not self.stations or alert.station_id in self.stations)
            and (not self.rules or alert.rule in self.rules or alert.code in self.rules)
        )

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        del data["id"], data["pending"]
        return data

    def counts_since(self, saved: Subscription, failing_after: int) -> WebhookCounts:
        """What this notifier counted since ``saved`` (a copy of itself at its last save, or
        as loaded): the increments the store adds to the record (``save_outbox``)."""
        # a success resets the failures in a row (one within the same ms as the saved one
        # shows as fewer failures in a row than saved)
        succeeded = (
            self.last_success_at_ms != saved.last_success_at_ms
            or self.consecutive_failures < saved.consecutive_failures
        )
        failures = self.consecutive_failures - (0 if succeeded else saved.consecutive_failures)
        failed_again = failures > 0 or self.last_failure_at_ms != saved.last_failure_at_ms
        return WebhookCounts(
            failing_after=failing_after,
            delivered=self.delivered - saved.delivered,
            failed=self.failed - saved.failed,
            expired=self.expired - saved.expired,
            dropped=self.dropped - saved.dropped,
            failures=failures,
            success_at_ms=self.last_success_at_ms if succeeded else None,
            failure_at_ms=self.last_failure_at_ms if failed_again else None,
            error=self.last_error if failed_again else None,
        )

    def view(self) -> dict[str, Any]:
        """What the API lists: everything but the secret (times RFC 3339)."""
        data = asdict(self)
        del data["secret"]
        for name in ("created_at_ms", "last_success_at_ms", "last_failure_at_ms"):
            data[name.removesuffix("_ms")] = rfc3339(data.pop(name))
        return data

    def created_view(self) -> dict[str, Any]:
        """The answer to its creation: the view and the signing secret, shown this once."""
        return {**self.view(), "secret": self.secret}


def new_subscription(url: str, **options: Any) -> Subscription:
    """A subscription to store (id 0 until stored), its options checked and its signing
    secret generated when none is given: serve's notifier and API replicas make them here.
    Raises ValueError for an unknown format or language."""
    fmt = options.get("format", "json")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if options.get("language") not in (None, *LANGUAGES):
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}")
    secret = options.pop("secret", None) or secrets.token_urlsafe(32)
    return Subscription(id=0, url=url, secret=secret, created_at_ms=_now_ms(), **options)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]()#>!|<~])")


def _md(text: object) -> str:
    """Markdown-escaped text: device data and rider words must not become links/markup."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


WECOM_MAX_BYTES = 4096  # WeCom robot: markdown.content, UTF-8
DINGTALK_TITLE_MAX = 64  # what a phone's notification shows of a DingTalk message
ROBOT_TEXT_MAX_BYTES = 16_384  # DingTalk and Feishu bodies stay far below their 20 KB


def _fit(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes, cut at a character and never after a lone escape."""
    data = text.encode()
    if len(data) <= limit:
        return text
    cut = data[: limit - len("…".encode())].decode(errors="ignore")
    if (len(cut) - len(cut.rstrip("\\"))) % 2:  # a markdown escape cut in half
        cut = cut[:-1]
    return cut + "…"


def render(
    fmt: str, secret: str, event: str, payload: dict[str, Any], language: str = "zh"
) -> tuple[str, bytes]:
    """(query suffix, body) for one attempt in the subscription's format and language."""
    message = compose(event, payload, language)
    if fmt == "json":  # every field as published, plus the message in words
        localized = {"language": message.language, "title": message.title}
        body_json = {**payload, **localized, "summary": message.text}
        return "", json.dumps(body_json, separators=(",", ":"), ensure_ascii=False).encode()
    title, lines = message.title, list(message.lines)
    md_title = _md(title)
    md_body = "\n".join(f"> {_md(line)}" for line in lines)
    url = payload.get("url")  # ours (configured, pattern-checked), not device data
    link = f"\n\n[{message.link_label}]({url})" if url else ""
    if fmt == "wecom":
        head = f"**{md_title}**\n"
        room = WECOM_MAX_BYTES - len(head.encode()) - len(link.encode())
        body: dict[str, Any] = {
            "msgtype": "markdown",
            "markdown": {"content": head + _fit(md_body, room) + link},
        }
        return "", json.dumps(body, ensure_ascii=False).encode()
    if fmt == "dingtalk":
        text = _fit(f"#### {md_title}\n{md_body}", ROBOT_TEXT_MAX_BYTES) + link
        body = {
            "msgtype": "markdown",
            "markdown": {"title": clip(title, DINGTALK_TITLE_MAX), "text": text},
        }
        query = ""
        if secret:  # DingTalk robot "加签": HMAC-SHA256(secret, f"{ts}\n{secret}"), base64
            ts = str(_now_ms())
            digest = hmac.new(secret.encode(), f"{ts}\n{secret}".encode(), hashlib.sha256)
            query = f"timestamp={ts}&sign={quote_plus(base64.b64encode(digest.digest()))}"
        return query, json.dumps(body, ensure_ascii=False).encode()
    # feishu: custom bot text message; with a secret, key = f"{ts}\n{secret}", empty message
    plain = _fit(message.text, ROBOT_TEXT_MAX_BYTES) + (f"\n{url}" if url else "")
    body = {"msg_type": "text", "content": {"text": plain}}
    if secret:
        ts_s = str(int(time.time()))
        digest = hmac.new(f"{ts_s}\n{secret}".encode(), b"", hashlib.sha256)
        body = {"timestamp": ts_s, "sign": base64.b64encode(digest.digest()).decode(), **body}
    return "", json.dumps(body, ensure_ascii=False).encode()


def place(catalog: Catalog | None, alert: Alert) -> dict[str, Any]:
    """What a notification adds to the alert about where it is: its station as the catalog
    names it (both languages) with the district's time zone, and its device's kind."""
    timezone = catalog.data.district.timezone if catalog is not None else DEFAULT_TIMEZONE
    station: dict[str, Any] = {"id": alert.station_id, "timezone": timezone}
    spec = catalog.stations.get(alert.station_id) if catalog is not None else None
    if spec is not None:
        station["name"] = spec.name.model_dump()
        station["address"] = spec.address.model_dump()
    device = catalog.devices.get(alert.device_id or "") if catalog is not None else None
    return {"station": station, "device_kind": device.kind if device is not None else None}


# Robot answers that mean "too many messages, try later" (a 200 with a code in the body):
# WeCom 45009 "api freq out of limit" (20 a minute per robot); DingTalk 130101 "send too
# fast" (20 a minute); Feishu 11232 "frequency limited" (100 a minute, 5 a second) and 9499
# "too many request". Any other code is a refusal that would repeat (bad signature, bad URL).
RATE_LIMITED: dict[str, frozenset[int]] = {
    "wecom": frozenset({45009}),
    "dingtalk": frozenset({130101}),
    "feishu": frozenset({11232, 9499}),
}


def _robot_error(fmt: str, response: httpx.Response) -> tuple[str | None, bool]:
    """Chat robots answer 200 with an error code in the body: (error, worth retrying)."""
    if fmt == "json":
        return None, False
    try:
        data = response.json()
    except ValueError:
        return None, False
    if not isinstance(data, dict):
        return None, False
    code = data.get("errcode", data.get("code", data.get("StatusCode", 0)))
    if code in (0, None):
        return None, False
    error = f"robot error {code}: {data.get('errmsg') or data.get('msg')}"
    return error, code in RATE_LIMITED.get(fmt, frozenset())


PENDING = "pending"
UNDELIVERED = ("failed", "expired", "dropped")  # given up, each with its reason in `error`
SAVE_RETRY_MAX_S = 30.0  # cap of the outbox's save backoff while the store cannot write
# A first attempt unanswered this long lets the next new notification start its own (a
# receiver answers in well under a second; one that does not must not queue the rest) ...
FRESH_PATIENCE_S = 1.0
# ... with at most this many first attempts in flight per subscription.
SAVER = "webhook:outbox"
CLAIMER = "webhook:claims"
FRESH_IN_FLIGHT = 4


# What a notification's view tells of its alert (the console names it in words from these).
NOTIFICATION_ALERT_FIELDS = (
    "severity",
    "title",
    "station",
    "device",
    "rule",
    "code",
    "port",
    "slot",
)


@dataclass(eq=False)
class Delivery:
    """One notification to one subscription: the outbox entry and the delivery log row."""

    id: int
    webhook_id: int
    alert_id: int
    event: str
    payload: dict[str, Any]
    created_ms: int
    deadline_ms: int
    status: str = PENDING
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None
    last_attempt_ms: int | None = None
    next_try_ms: int | None = None
    finished_ms: int | None = None
    body: str = ""  # the payload's JSON as stored

    def row(self) -> tuple[Any, ...]:
        values = {
            "id": self.id,
            "webhook_id": self.webhook_id,
            "alert_id": self.alert_id,
            "event": self.event,
            "status": self.status,
            "attempts": self.attempts,
            "http_status": self.http_status,
            "error": self.error,
            "created_at_ms": self.created_ms,
            "finished_at_ms": self.finished_ms,
            "body": self.body or json.dumps(self.payload),
            "next_try_at_ms": self.next_try_ms,
            "deadline_at_ms": self.deadline_ms,
            "last_attempt_at_ms": self.last_attempt_ms,
        }
        return tuple(values[c] for c in DELIVERY_COLUMNS)

    @classmethod
    def from_row(cls, row: dict[str, Any], deadline_s: float) -> Delivery:
        created = int(row["created_at_ms"])
        deadline = row.get("deadline_at_ms")
        return cls(
            id=int(row["id"]),
            webhook_id=int(row["webhook_id"]),
            alert_id=int(row["alert_id"]),
            event=str(row["event"]),
            payload=json.loads(row["body"]),
            created_ms=created,
            deadline_ms=int(deadline) if deadline is not None else created + int(deadline_s * 1000),
            status=str(row["status"]),
            attempts=int(row["attempts"]),
            http_status=row.get("http_status"),
            error=row.get("error"),
            last_attempt_ms=row.get("last_attempt_at_ms"),
            next_try_ms=row.get("next_try_at_ms"),
            finished_ms=row.get("finished_at_ms"),
            body=str(row["body"]),
        )

    def log_entry(self) -> dict[str, Any]:
        """One row of an alert's delivery log, as the API shows it."""
        return {
            "id": self.id,
            "webhook_id": self.webhook_id,
            "event": self.event,
            "status": self.status,
            "attempts": self.attempts,
            "http_status": self.http_status,
            "error": self.error,
            "created_at": rfc3339(self.created_ms),
            "finished_at": rfc3339(self.finished_ms),
            "last_attempt_at": rfc3339(self.last_attempt_ms),
            "next_try_at": rfc3339(self.next_try_ms),
            "deadline": rfc3339(self.deadline_ms),
        }

    def view(self, subscription_name: str | None) -> dict[str, Any]:
        """What the API and the console show of an undelivered notification."""
        alert = self.payload.get("alert") or {}
        return {
            "id": self.id,
            "subscription": {"id": self.webhook_id, "name": subscription_name},
            "alert_id": self.alert_id,
            "event": self.event,
            "state": self.status,
            "attempts": self.attempts,
            "http_status": self.http_status,
            "last_error": self.error,
            "created_at": rfc3339(self.created_ms),
            "last_attempt_at": rfc3339(self.last_attempt_ms),
            "next_try_at": rfc3339(self.next_try_ms) if self.status == PENDING else None,
            "deadline": rfc3339(self.deadline_ms),
            "finished_at": rfc3339(self.finished_ms),
            "alert": {k: alert.get(k) for k in NOTIFICATION_ALERT_FIELDS},
        }


@dataclass(eq=False)
class _Outbox:
    """One subscription's deliveries not yet finished, and its two lanes."""

    sub: Subscription
    fresh: deque[Delivery] = field(default_factory=deque)  # never tried, in publish order
    waiting: dict[int, Delivery] = field(default_factory=dict)  # failed once or more, by id
    in_flight: set[int] = field(default_factory=set)
    fresh_ready: asyncio.Event = field(default_factory=asyncio.Event)
    retry_ready: asyncio.Event = field(default_factory=asyncio.Event)
    lanes: tuple[str, str] = ("", "")  # its supervised tasks' names (fresh, retry)

    def __len__(self) -> int:
        return len(self.fresh) + len(self.waiting) + len(self.in_flight)

    def oldest_waiting(self) -> Delivery | None:
        """The entry to drop when full: the oldest waiting one, never one in flight."""
        if self.waiting:
            return self.waiting[min(self.waiting)]
        return self.fresh[0] if self.fresh else None


class Notifier:
    def __init__(
        self,
        store: AlertStore,
        options: WebhookOptions,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        supervisor: Supervisor | None = None,
        catalog: Catalog | None = None,
        claim_lease_s: float | None = None,
        ids: IdPool | None = None,
    ) -> None:
        if (claim_lease_s is None) != (ids is None):
            raise ValueError("claims of deliveries need delivery ids from the database, too")
        if claim_lease_s is not None and not 1.0 <= claim_lease_s <= 3600.0:
            raise ValueError(f"claim lease of 1 to 3600 s, not {claim_lease_s}")
        self.store = store
        self.options = options
        self.claim_lease_s = claim_lease_s
        self.ids = ids
        self._claimed: set[int] = set()  # live deliveries saved under our claim (renewed)
        self.taken_over = 0  # deliveries claimed from another writer (or never claimed)
        self.lost_claims = 0  # deliveries whose claim ran out here: no longer sent by us
        # station names and addresses, the district's time zone: what messages say
        self.catalog = catalog
        # the lanes and the outbox saver run under it: a death is said, alerted, restarted
        # (a notifier of its own has one of its own, entered and left with the notifier)
        self._own_supervisor = supervisor is None
        self.supervisor = supervisor or Supervisor()
        self._transport = transport
        self.subscriptions: dict[int, Subscription] = {}
        # each subscription as last saved (or loaded): its counts since are what a save adds
        self._saved_subs: dict[int, Subscription] = {}
        self._boxes: dict[int, _Outbox] = {}
        self._live: dict[int, Delivery] = {}  # every pending delivery, by id
        self._unsaved: dict[int, Delivery] = {}  # changed since last saved
        self._unsaved_subs: set[int] = set()
        self._save_ready = asyncio.Event()
        self._saving = False
        self._changed = asyncio.Event()  # something finished or was saved (idle())
        self._client: httpx.AsyncClient | None = None
        self._last_id = 0
        self.save_failures = 0  # outbox saves that failed (the store could not write)
        self.on_result: list[Any] = []  # callbacks (delivered: bool) for metrics
        self._subs_lock = asyncio.Lock()  # add, remove and sync, one at a time

    async def __aenter__(self) -> Self:
        if self._own_supervisor:
            await self.supervisor.__aenter__()
        try:
            return await self._enter()
        except BaseException:
            if self._own_supervisor:
                await self.supervisor.__aexit__(None, None, None)
            raise

    async def _enter(self) -> Self:
        self._client = httpx.AsyncClient(
            timeout=self.options.timeout_s, transport=self._transport, follow_redirects=False
        )
        for webhook_id, record in await asyncio.to_thread(self.store.webhooks):
            self._start(Subscription(id=webhook_id, **record))
        if self.claim_lease_s is not None:
            self.supervisor.start(SAVER, self._save_loop)
            self.supervisor.start(CLAIMER, self._claim_loop)
            return self
        self._last_id = await asyncio.to_thread(self.store.max_delivery_id)
        rows = await asyncio.to_thread(self.store.deliveries, status=PENDING)
        self._resume(rows)
        if self._live:
            log.info("webhooks: %d pending deliveries resumed", len(self._live))
        self.supervisor.start(SAVER, self._save_loop)
        return self

    def _resume(self, rows: list[dict[str, Any]]) -> int:
        """Pending rows of the store sent from here on (due now, oldest first); returns
        how many. A row already live here is ours already."""
        now, resumed = _now_ms(), 0
        for row in rows:
            delivery = Delivery.from_row(row, self.options.deadline_s)
            if delivery.id in self._live:
                continue
            box = self._boxes.get(delivery.webhook_id)
            if box is None:
                self._finish(delivery, "dropped", "subscription removed")
            elif now >= delivery.deadline_ms:
                self._finish(delivery, "expired", "deadline passed while the service was stopped")
            else:  # a restart is a good moment to try again: due now, oldest first
                delivery.next_try_ms = now
                self._live[delivery.id] = delivery
                self._wait_retry(box, delivery)
                resumed += 1
        return resumed

    async def _claim_loop(self) -> None:
        """Renew the claims of what we send; take over what nobody holds any more."""
        assert self.claim_lease_s is not None
        lease_ms = int(self.claim_lease_s * 1000)
        while True:
            if self.ids is not None:  # the delivery ids of the next notifications, ahead
                await self.ids.top_up()
            mine = [i for i in self._claimed if i in self._live]
            self._claimed.intersection_update(mine)
            renewed = await asyncio.to_thread(self.store.renew_claims, mine, _now_ms(), lease_ms)
            for lost in set(mine) - renewed:  # run out: another writer may send it now
                self._claimed.discard(lost)
                delivery = self._live.pop(lost, None)
                if delivery is None:
                    continue
                self.lost_claims += 1
                log.warning("webhooks: the claim of delivery %d ran out; left to others", lost)
                box = self._boxes.get(delivery.webhook_id)
                if box is not None:
                    with contextlib.suppress(ValueError):
                        box.fresh.remove(delivery)
                    box.waiting.pop(lost, None)
                    box.sub.pending = len(box)
                self._unsaved.pop(lost, None)
                self._changed.set()
            rows = await asyncio.to_thread(self.store.claim_deliveries, _now_ms(), lease_ms)
            if any(int(r["webhook_id"]) not in self._boxes for r in rows):
                # added elsewhere and not heard of yet, or removed: the store tells which
                await self.sync()
            taken = self._resume(rows)
            self._claimed.update(int(r["id"]) for r in rows)
            if taken:
                self.taken_over += taken
                log.info("webhooks: %d pending deliveries claimed", taken)
            await asyncio.sleep(self.claim_lease_s / 3)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for box in self._boxes.values():
            for name in box.lanes:
                await self.supervisor.stop(name)
        await self.supervisor.stop(SAVER)
        if self.claim_lease_s is not None:
            await self.supervisor.stop(CLAIMER)
        # what was in flight or waiting stays pending: sent after the next start
        error = await self._save()
        if error is not None:
            log.error(
                "webhooks: %d delivery states could not be saved at stop (%s); pending ones"
                " among them are not resumed after the next start",
                len(self._unsaved), error,
            )  # fmt: skip
        if self._client is not None:
            await self._client.aclose()
        if self._own_supervisor:
            await self.supervisor.__aexit__(et, e, tb)

    @property
    def task_names(self) -> list[str]:
        """The supervised tasks' names: the outbox saver, two lanes per subscription (and
        the claimer, with claims)."""
        claimer = [CLAIMER] if self.claim_lease_s is not None else []
        return [SAVER, *claimer, *(name for box in self._boxes.values() for name in box.lanes)]

    @property
    def pending_count(self) -> int:
        """Deliveries not finished yet (waiting or in flight), all subscriptions."""
        return len(self._live)

    def _start(self, sub: Subscription) -> None:
        self.subscriptions[sub.id] = sub
        self._saved_subs[sub.id] = replace(sub)
        box = self._boxes[sub.id] = _Outbox(sub)
        box.lanes = (f"webhook:{sub.id}:fresh", f"webhook:{sub.id}:retry")
        self.supervisor.start(box.lanes[0], functools.partial(self._fresh_lane, box))
        self.supervisor.start(box.lanes[1], functools.partial(self._retry_lane, box))

    # -- subscriptions -----------------------------------------------------------------

    async def add(self, url: str, **options: Any) -> Subscription:
        sub = new_subscription(url, **options)
        async with self._subs_lock:
            sub.id = await asyncio.to_thread(self.store.add_webhook, sub.record())
            self._start(sub)
        return sub

    async def remove(self, webhook_id: int) -> bool:
        async with self._subs_lock:
            await self._stop(webhook_id)
            return await asyncio.to_thread(self.store.delete_webhook, webhook_id)

    async def _stop(self, webhook_id: int) -> None:
        """A subscription no longer served: its lanes stop, and what it had pending (waiting
        or in flight) is ``dropped`` ("subscription removed")."""
        self.subscriptions.pop(webhook_id, None)
        self._saved_subs.pop(webhook_id, None)
        box = self._boxes.pop(webhook_id, None)
        if box is not None:
            for name in box.lanes:
                await self.supervisor.stop(name)
            for delivery in [d for d in self._live.values() if d.webhook_id == webhook_id]:
                self._finish(delivery, "dropped", "subscription removed")
        self._unsaved_subs.discard(webhook_id)

    async def sync(self) -> tuple[int, int]:
        """Serve the store's subscriptions: start those added elsewhere (an API replica),
        stop those removed there (as ``remove`` does); (started, stopped). A subscription
        served already keeps its counters (the stored ones at its start, plus this
        notifier's own since)."""
        async with self._subs_lock:
            stored = dict(await asyncio.to_thread(self.store.webhooks))
            started = [i for i in stored if i not in self._boxes]
            stopped = [i for i in self._boxes if i not in stored]
            for webhook_id in stopped:
                await self._stop(webhook_id)
                log.info("webhooks: subscription %d removed elsewhere; stopped", webhook_id)
            for webhook_id in started:
                self._start(Subscription(id=webhook_id, **stored[webhook_id]))
                log.info("webhooks: subscription %d added elsewhere; started", webhook_id)
            return len(started), len(stopped)

    # -- publishing --------------------------------------------------------------------

    def publish(self, event: str, alert: Alert, extra: dict[str, Any] | None = None) -> int:
        """Send ``event`` of ``alert`` to every subscription that wants it: on the loop, at
        once, from memory (the outbox is saved behind it). ``extra``: more top-level fields
        of the payload (an overdue notice's ``work_order``)."""
        now = _now_ms()
        payload: dict[str, Any] = {"event": event, "alert": alert_view(alert), **(extra or {})}
        if self.options.public_url:
            payload["url"] = f"{self.options.public_url.rstrip('/')}/console#alert-{alert.id}"
        payload["created_at"] = rfc3339(now)
        payload.update(place(self.catalog, alert))
        body = json.dumps(payload)
        queued = 0
        for box in list(self._boxes.values()):
            if not box.sub.wants(event, alert):
                continue
            if len(box) >= self.options.queue_max:
                oldest = box.oldest_waiting()
                if oldest is not None:  # the newest state matters most
                    self._finish(oldest, "dropped", f"queue full ({self.options.queue_max})")
            delivery = Delivery(
                id=self._new_id(now),
                webhook_id=box.sub.id,
                alert_id=alert.id,
                event=event,
                payload=payload,
                created_ms=now,
                deadline_ms=now + int(self.options.deadline_s * 1000),
                next_try_ms=now,
                body=body,
            )
            self._live[delivery.id] = delivery
            box.fresh.append(delivery)
            box.fresh_ready.set()
            box.sub.pending = len(box)
            self._mark(delivery)
            queued += 1
        return queued

    def _new_id(self, now_ms: int) -> int:
        """Increasing, and unique across restarts even if the store lost the last ones: the
        creation time in µs-sized steps (below 2^53 until the year 2255). With several
        writers, from the database's sequence (``ids``), which migration 0004 started
        after the time-based ones."""
        if self.ids is not None:
            return self.ids.take()
        self._last_id = max(self._last_id + 1, now_ms * 1000)
        return self._last_id

    def pending(self) -> list[dict[str, Any]]:
        """Views of the deliveries not finished yet (waiting or in flight), oldest first."""
        return [self._view(d) for d in sorted(self._live.values(), key=lambda d: d.id)]

    async def undelivered(self, limit: int = 100) -> tuple[list[dict[str, Any]], bool]:
        """Views of given-up deliveries, newest first, and whether the store could be read
        (if not: only those not saved yet, from memory)."""
        unsaved = {d.id: d for d in self._unsaved.values() if d.status in UNDELIVERED}
        complete = True
        try:
            rows = await asyncio.to_thread(
                self.store.deliveries, status=UNDELIVERED, newest_first=True, limit=limit
            )
        except Exception as exc:
            log.warning("webhooks: undelivered notifications cannot be read: %s", exc)
            rows, complete = [], False
        for row in rows:
            unsaved.setdefault(int(row["id"]), Delivery.from_row(row, self.options.deadline_s))
        found = sorted(unsaved.values(), key=lambda d: d.id, reverse=True)[:limit]
        return [self._view(d) for d in found], complete

    async def log(self, alert_id: int) -> list[Delivery]:
        """Every delivery of an alert, oldest first: the store's rows, updated by what has
        not been saved yet."""
        rows = await asyncio.to_thread(self.store.deliveries, alert_id)
        found = {int(r["id"]): Delivery.from_row(r, self.options.deadline_s) for r in rows}
        for delivery in [*self._live.values(), *self._unsaved.values()]:
            if delivery.alert_id == alert_id:
                found[delivery.id] = delivery
        return [found[i] for i in sorted(found)]

    def _view(self, delivery: Delivery) -> dict[str, Any]:
        sub = self.subscriptions.get(delivery.webhook_id)
        return delivery.view(sub.name if sub is not None else None)

    async def idle(self) -> None:
        """Wait until no delivery is pending and every change is saved (tests, tools)."""
        while self._live or self._unsaved or self._unsaved_subs or self._saving:
            self._changed.clear()
            await self._changed.wait()

    # -- the lanes ---------------------------------------------------------------------

    async def _fresh_lane(self, box: _Outbox) -> None:
        """First attempts in publish order, each awaited; one still unanswered after
        ``FRESH_PATIENCE_S`` (a slow or black-holed receiver) no longer holds back the next,
        up to ``FRESH_IN_FLIGHT`` at once."""
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                if not box.fresh:
                    box.fresh_ready.clear()
                    await box.fresh_ready.wait()
                    continue
                if len(running) >= FRESH_IN_FLIGHT:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                delivery = box.fresh.popleft()
                task = asyncio.create_task(
                    self._attempt_safely(box, delivery), name=f"webhook:{box.sub.id}:first"
                )
                running.add(task)
                task.add_done_callback(running.discard)
                await asyncio.wait({task}, timeout=min(FRESH_PATIENCE_S, self.options.timeout_s))
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _retry_lane(self, box: _Outbox) -> None:
        while True:
            if not box.waiting:
                box.retry_ready.clear()
                await box.retry_ready.wait()
                continue
            delivery = min(box.waiting.values(), key=lambda d: (d.next_try_ms or 0, d.id))
            wait_s = ((delivery.next_try_ms or 0) - _now_ms()) / 1000
            if wait_s > 0:  # until it is due, or something changes (a success, a new one)
                box.retry_ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await box.retry_ready.wait()
                continue
            del box.waiting[delivery.id]
            await self._attempt_safely(box, delivery)

    async def _attempt_safely(self, box: _Outbox, delivery: Delivery) -> None:
        """An attempt; a bug in its bookkeeping is logged and the delivery waits for its
        next try, instead of ending the lane (and every later notification with it)."""
        try:
            await self._attempt(box, delivery)
        except asyncio.CancelledError:  # a stop, or its lane died: it waits for a next try
            if delivery.id in self._live and delivery.id not in box.waiting:
                self._wait_retry(box, delivery)
            raise
        except Exception:
            log.exception("webhook %d delivery %d: attempt failed", box.sub.id, delivery.id)
            if delivery.id in self._live:
                delivery.next_try_ms = _now_ms() + int(self.options.backoff_max_s * 1000)
                self._wait_retry(box, delivery)

    def _wait_retry(self, box: _Outbox, delivery: Delivery) -> None:
        box.waiting[delivery.id] = delivery
        box.sub.pending = len(box)
        box.retry_ready.set()

    async def _attempt(self, box: _Outbox, delivery: Delivery) -> None:
        sub, opts = box.sub, self.options
        box.in_flight.add(delivery.id)
        try:
            delivery.attempts += 1
            delivered, retry = await self._post(sub, delivery)
        finally:
            box.in_flight.discard(delivery.id)
        now = delivery.last_attempt_ms = _now_ms()
        if delivered:
            if sub.consecutive_failures >= opts.failing_after:
                log.info("webhook %d (%s) delivers again", sub.id, sub.url)
            sub.consecutive_failures = 0
            sub.failing = False
            sub.last_success_at_ms = now
            self._finish(delivery, "delivered")
            if box.waiting:  # the receiver is back: what waits goes now, oldest first
                for waiting in box.waiting.values():
                    waiting.next_try_ms = now
                box.retry_ready.set()
            return
        sub.consecutive_failures += 1
        sub.last_error = delivery.error
        sub.last_failure_at_ms = now
        if sub.consecutive_failures >= opts.failing_after and not sub.failing:
            sub.failing = True
            log.warning("webhook %d (%s) is failing: %s", sub.id, sub.url, delivery.error)
        if not retry:
            self._finish(delivery, "failed", delivery.error)
        elif now >= delivery.deadline_ms or 0 < opts.attempts <= delivery.attempts:
            age_s = (now - delivery.created_ms) / 1000
            self._finish(
                delivery,
                "expired",
                f"gave up after {delivery.attempts} attempts in {age_s:.0f} s: {delivery.error}",
            )
        else:
            base = min(opts.backoff_s * 2 ** (delivery.attempts - 1), opts.backoff_max_s)
            delay_ms = int(base * random.uniform(0.5, 1.0) * 1000)
            delivery.next_try_ms = min(now + delay_ms, delivery.deadline_ms)
            log.log(  # the first failure of each; the rest only at debug (hours of them)
                logging.INFO if delivery.attempts == 1 else logging.DEBUG,
                "webhook %d delivery %d attempt %d failed (%s); retry in %.2fs",
                sub.id, delivery.id, delivery.attempts, delivery.error, delay_ms / 1000,
            )  # fmt: skip
            self._wait_retry(box, delivery)
            self._mark(delivery)
        self._unsaved_subs.add(sub.id)

    async def _post(self, sub: Subscription, delivery: Delivery) -> tuple[bool, bool]:
        """One attempt: (delivered, worth retrying); sets its status and error."""
        assert self._client is not None
        language = sub.language or self.options.language
        query, body = render(sub.format, sub.secret, delivery.event, delivery.payload, language)
        url = sub.url + (("&" if "?" in sub.url else "?") + query if query else "")
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "chargewatch-webhook/1",
            SIGNATURE_HEADER: sign(sub.secret, body),
            "X-Chargewatch-Event": delivery.event,
            "X-Chargewatch-Delivery": str(delivery.id),
            "X-Chargewatch-Attempt": str(delivery.attempts),
        }
        status: int | None = None
        try:
            response = await self._client.post(url, content=body, headers=headers)
            status = response.status_code
            if 200 <= status < 300:
                error, retry = _robot_error(sub.format, response)
            else:
                error, retry = f"HTTP {status}", status >= 500 or status in (408, 429)
        except httpx.TimeoutException as exc:
            error, retry = f"timeout: {exc!r}", True
        except httpx.TransportError as exc:
            error, retry = f"connection: {exc!r}", True
        except Exception as exc:  # a bug of ours or httpx's: keep the notification, say so
            log.exception(
                "webhook %d delivery %d: attempt failed unexpectedly", sub.id, delivery.id
            )
            error, retry = f"error: {exc!r}", True
        delivery.http_status, delivery.error = status, error
        return error is None, retry

    def _finish(self, delivery: Delivery, status: str, error: str | None = None) -> None:
        delivery.status = status
        delivery.error = error
        delivery.finished_ms = _now_ms()
        delivery.next_try_ms = None
        self._live.pop(delivery.id, None)
        box = self._boxes.get(delivery.webhook_id)
        if box is not None:
            with contextlib.suppress(ValueError):
                box.fresh.remove(delivery)
            box.waiting.pop(delivery.id, None)
            box.sub.pending = len(box)
            if status == "expired":
                box.sub.expired += 1
            if status in ("failed", "expired"):
                box.sub.failed += 1
            elif status == "delivered":
                box.sub.delivered += 1
            elif status == "dropped":
                box.sub.dropped += 1
            self._unsaved_subs.add(box.sub.id)
        if status in UNDELIVERED:
            log.warning(
                "webhook %d: notification %s of alert %d %s after %d attempts: %s",
                delivery.webhook_id, delivery.event, delivery.alert_id, status,
                delivery.attempts, error,
            )  # fmt: skip
        if status in ("delivered", "failed", "expired"):
            for callback in self.on_result:
                callback(status == "delivered")
        self._mark(delivery)
        self._changed.set()

    # -- the outbox in the store -------------------------------------------------------

    def _mark(self, delivery: Delivery) -> None:
        self._unsaved[delivery.id] = delivery
        self._save_ready.set()

    async def _save_loop(self) -> None:
        delay = 0.5
        failing_since: float | None = None
        last_warned = 0.0
        while True:
            await self._save_ready.wait()
            self._save_ready.clear()
            error = await self._save()
            if error is None:
                if failing_since is not None:
                    log.warning(
                        "webhooks: outbox saved again after %.0f s",
                        time.monotonic() - failing_since,
                    )
                failing_since, delay = None, 0.5
                continue
            now = time.monotonic()
            if failing_since is None or now - last_warned >= 60:
                log.warning(
                    "webhooks: outbox not saved for %.0f s (%d deliveries unsaved: %s);"
                    " sending goes on, saving is retried",
                    0 if failing_since is None else now - failing_since,
                    len(self._unsaved), error,
                )  # fmt: skip
                last_warned = now
            failing_since = failing_since or now
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, SAVE_RETRY_MAX_S)
            self._save_ready.set()

    async def _save(self) -> Exception | None:
        """Write what changed; on failure keep it for the next try (and return the error)."""
        if not self._unsaved and not self._unsaved_subs:
            return None
        batch, self._unsaved = self._unsaved, {}
        sub_ids, self._unsaved_subs = self._unsaved_subs, set()
        rows = [d.row() for d in batch.values()]  # on the loop: a consistent picture
        saving = {i: replace(self.subscriptions[i]) for i in sub_ids if i in self.subscriptions}
        failing_after = self.options.failing_after
        counts = [
            (i, sub.counts_since(self._saved_subs[i], failing_after)) for i, sub in saving.items()
        ]
        claim = None
        if self.claim_lease_s is not None:  # a new row is ours; the claimer renews it
            claim = _now_ms() + int(self.claim_lease_s * 1000)
        self._saving = True
        write = asyncio.ensure_future(
            asyncio.to_thread(self.store.save_outbox, rows, counts, claim_until_ms=claim)
        )
        write.add_done_callback(_retrieved)
        stopped: asyncio.CancelledError | None = None
        refused: Exception | None = None
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError as exc:
            # a stop: the thread writes on regardless, and its outcome says what is still
            # unsaved (counts sent again after a write that went through count twice)
            stopped = exc
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({write})
        except Exception as exc:
            refused = exc
        finally:
            self._saving = False
            self._changed.set()
        if not (write.done() and not write.cancelled() and write.exception() is None):
            self._unsaved = {**batch, **self._unsaved}  # written again by the next save
            self._unsaved_subs |= sub_ids
            if stopped is not None:
                raise stopped
            self.save_failures += 1
            return refused or RuntimeError("the outbox's write did not finish")
        for webhook_id, sub in saving.items():  # counted from here on (unless removed meanwhile)
            if webhook_id in self._saved_subs:
                self._saved_subs[webhook_id] = sub
        if claim is not None:
            self._claimed.update(i for i, d in batch.items() if d.status == PENDING)
        if stopped is not None:
            raise stopped
        return None
