"""Webhook subscriptions and their deliveries.

``Notifier.publish`` is called on the loop and only queues (never blocks ingest). Each
subscription has its own queue and worker task, so a slow or dead receiver delays nobody
else. A delivery is POSTed with ``X-Chargewatch-Signature: sha256=<hex>``, the HMAC-SHA256
of the exact body with the subscription's secret (plus the robots' own signing for DingTalk
and Feishu), retried with jittered exponential backoff on timeouts, connection errors, 5xx
and 429, and logged per alert. After ``failing_after`` failed deliveries in a row the
subscription is marked ``failing`` (reported by the API); a later success clears the mark.

Durable: a notification becomes a pending delivery row (the outbox writer task, on a worker
thread) before its subscription's worker sends it, so what a stop or a crash interrupts,
queued or in flight, is sent after the next start. Only the milliseconds between ``publish``
and that write are not covered (as for the alert itself, which its own writer persists).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote_plus

import httpx

from ingest.alerts.config import WebhookOptions
from ingest.alerts.model import NOTIFIED_EVENTS, Alert, alert_view, rfc3339
from ingest.alerts.store import AlertStore

log = logging.getLogger(__name__)

Format = Literal["json", "wecom", "dingtalk", "feishu"]
FORMATS: tuple[str, ...] = ("json", "wecom", "dingtalk", "feishu")
SIGNATURE_HEADER = "X-Chargewatch-Signature"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
    created_at_ms: int = 0
    failing: bool = False
    consecutive_failures: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    last_error: str | None = None
    last_success_at_ms: int | None = None
    last_failure_at_ms: int | None = None

    def wants(self, event: str, alert: Alert) -> bool:
        return (
            event in self.events
            and (not self.severities or alert.severity in self.severities)
            and (not self.stations or alert.station_id in self.stations)
            and (not self.rules or alert.rule in self.rules or alert.code in self.rules)
        )

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        del data["id"]
        return data

    def view(self) -> dict[str, Any]:
        data = asdict(self)
        del data["secret"]
        for name in ("created_at_ms", "last_success_at_ms", "last_failure_at_ms"):
            data[name.removesuffix("_ms")] = rfc3339(data.pop(name))
        return data


@dataclass(frozen=True, slots=True)
class _Job:
    delivery_id: int
    event: str
    payload: dict[str, Any]


_MD_SPECIAL = re.compile(r"([\\`*_\[\]()#>!|<~])")


def _md(text: object) -> str:
    """Markdown-escaped text: device data and rider words must not become links/markup."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def _summary_lines(event: str, a: dict[str, Any]) -> tuple[str, list[str]]:
    what = a["code"] if a["rule"] == "fault" else a["rule"]
    where = a["device"] or a["station"]
    unit = f" port {a['port']}" if a.get("port") else f" slot {a['slot']}" if a.get("slot") else ""
    title = f"[{a['severity'].upper()}] {what} {event}: {where}{unit}"
    lines = [
        f"station: {a['station']}",
        f"status: {a['status']}, count {a['count']}",
        f"opened: {a['opened_at']}",
    ]
    if a.get("last_value") is not None:
        lines.append(f"value: {a['last_value']} {a.get('info') or ''}".rstrip())
    elif a.get("info"):
        lines.append(f"info: {a['info']}")
    if event == "escalated":
        lines.append(f"not acknowledged; escalation {a['escalation_level']}")
    if event == "resolved":
        lines.append(f"resolved {a['resolved_how']} at {a['resolved_at']}")
    lines.append(f"alert id: {a['id']}")
    return title, lines


def render(fmt: str, secret: str, event: str, payload: dict[str, Any]) -> tuple[str, bytes]:
    """(query suffix, body) for one attempt in the subscription's format."""
    if fmt == "json":
        return "", json.dumps(payload, separators=(",", ":")).encode()
    title, lines = _summary_lines(event, payload["alert"])
    md_title = _md(title)
    md_body = "\n".join(f"> {_md(line)}" for line in lines)
    url = payload.get("url")  # ours (configured, pattern-checked), not device data
    if url:
        md_body += f"\n\n[控制台 Console]({url})"
        lines = [*lines, url]
    if fmt == "wecom":
        body: dict[str, Any] = {
            "msgtype": "markdown",
            "markdown": {"content": f"**{md_title}**\n{md_body}"},
        }
        return "", json.dumps(body, ensure_ascii=False).encode()
    if fmt == "dingtalk":
        body = {
            "msgtype": "markdown",
            "markdown": {"title": title[:64], "text": f"#### {md_title}\n{md_body}"},
        }
        query = ""
        if secret:  # DingTalk robot "加签": HMAC-SHA256(secret, f"{ts}\n{secret}"), base64
            ts = str(_now_ms())
            digest = hmac.new(secret.encode(), f"{ts}\n{secret}".encode(), hashlib.sha256)
            query = f"timestamp={ts}&sign={quote_plus(base64.b64encode(digest.digest()))}"
        return query, json.dumps(body, ensure_ascii=False).encode()
    # feishu: custom bot text message; with a secret, key = f"{ts}\n{secret}", empty message
    text = title + "\n" + "\n".join(lines)
    body = {"msg_type": "text", "content": {"text": text}}
    if secret:
        ts_s = str(int(time.time()))
        digest = hmac.new(f"{ts_s}\n{secret}".encode(), b"", hashlib.sha256)
        body = {"timestamp": ts_s, "sign": base64.b64encode(digest.digest()).decode(), **body}
    return "", json.dumps(body, ensure_ascii=False).encode()


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


class Notifier:
    def __init__(
        self,
        store: AlertStore,
        options: WebhookOptions,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.store = store
        self.options = options
        self._transport = transport
        self.subscriptions: dict[int, Subscription] = {}
        self._queues: dict[int, asyncio.Queue[_Job]] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}
        # (subscription, event, payload, created ms), waiting to become delivery rows
        self._outbox: asyncio.Queue[tuple[int, str, dict[str, Any], int]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self.on_result: list[Any] = []  # callbacks (delivered: bool) for metrics

    async def __aenter__(self) -> Self:
        self._client = httpx.AsyncClient(
            timeout=self.options.timeout_s, transport=self._transport, follow_redirects=False
        )
        for webhook_id, record in await asyncio.to_thread(self.store.webhooks):
            self._start(Subscription(id=webhook_id, **record))
        for row in await asyncio.to_thread(self.store.deliveries, status="pending"):
            queue = self._queues.get(row["webhook_id"])
            if queue is not None:
                queue.put_nowait(_Job(row["id"], row["event"], json.loads(row["body"])))
        self._writer = asyncio.create_task(self._write_outbox(), name="webhook-outbox")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        tasks = [self._writer] if self._writer is not None else []
        tasks += self._workers.values()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = []  # published, not yet written: pending for the next start
        while not self._outbox.empty():
            left.append(self._outbox.get_nowait())
        if left:
            await self._persist(left, enqueue=False)
        if self._client is not None:
            await self._client.aclose()

    def _start(self, sub: Subscription) -> None:
        self.subscriptions[sub.id] = sub
        self._queues[sub.id] = asyncio.Queue()
        self._workers[sub.id] = asyncio.create_task(self._worker(sub), name=f"webhook:{sub.id}")

    # -- subscriptions -----------------------------------------------------------------

    async def add(self, url: str, **options: Any) -> Subscription:
        fmt = options.get("format", "json")
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        secret = options.pop("secret", None) or secrets.token_urlsafe(32)
        sub = Subscription(id=0, url=url, secret=secret, created_at_ms=_now_ms(), **options)
        sub.id = await asyncio.to_thread(self.store.add_webhook, sub.record())
        self._start(sub)
        return sub

    async def remove(self, webhook_id: int) -> bool:
        task = self._workers.pop(webhook_id, None)
        self.subscriptions.pop(webhook_id, None)
        self._queues.pop(webhook_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return await asyncio.to_thread(self.store.delete_webhook, webhook_id)

    # -- publishing --------------------------------------------------------------------

    def publish(self, event: str, alert: Alert) -> int:
        """Queue ``event`` of ``alert`` for every subscription that wants it (on the loop)."""
        queued = 0
        payload: dict[str, Any] = {"event": event, "alert": alert_view(alert)}
        if self.options.public_url:
            payload["url"] = f"{self.options.public_url.rstrip('/')}/console#alert-{alert.id}"
        now = _now_ms()
        for sub in self.subscriptions.values():
            if sub.wants(event, alert):
                self._outbox.put_nowait((sub.id, event, payload, now))
                queued += 1
        return queued

    async def idle(self) -> None:
        """Wait until every queue is empty and nothing is in flight (tests, shutdown)."""
        await self._outbox.join()
        for queue in list(self._queues.values()):
            await queue.join()

    async def _write_outbox(self) -> None:
        while True:
            items = [await self._outbox.get()]
            while not self._outbox.empty():
                items.append(self._outbox.get_nowait())
            try:
                await self._persist(items, enqueue=True)
            finally:
                for _ in items:
                    self._outbox.task_done()

    async def _persist(
        self, items: list[tuple[int, str, dict[str, Any], int]], *, enqueue: bool
    ) -> None:
        """Write ``items`` as pending deliveries, then hand each to its subscription's worker.
        A store that fails must not silence notifications: they are sent unrecorded."""
        jobs = [
            (sub_id, _Job(0, event, {**payload, "created_at": rfc3339(created)}), created)
            for sub_id, event, payload, created in items
        ]

        def write() -> list[int]:
            return [
                self.store.add_delivery(
                    sub_id, job.payload["alert"]["id"], job.event, created, json.dumps(job.payload)
                )
                for sub_id, job, created in jobs
            ]

        try:
            ids = await asyncio.to_thread(write)
        except Exception:
            log.exception("webhook deliveries could not be recorded; sending them anyway")
            ids = [0] * len(jobs)
        if not enqueue:
            return
        for (sub_id, job, _), delivery_id in zip(jobs, ids, strict=True):
            queue, sub = self._queues.get(sub_id), self.subscriptions.get(sub_id)
            if queue is None or sub is None:
                continue  # removed meanwhile
            if queue.qsize() >= self.options.queue_max:
                dropped = queue.get_nowait()  # the oldest goes: the newest state matters most
                queue.task_done()
                sub.dropped += 1
                log.warning("webhook %d: queue full, oldest notification dropped", sub.id)
                await asyncio.to_thread(
                    self.store.finish_delivery,
                    dropped.delivery_id,
                    status="dropped",
                    attempts=0,
                    http_status=None,
                    error="queue full",
                    finished_ms=_now_ms(),
                )
            queue.put_nowait(_Job(delivery_id, job.event, job.payload))

    async def _worker(self, sub: Subscription) -> None:
        queue = self._queues[sub.id]
        while True:
            job = await queue.get()
            try:
                await self._deliver(sub, job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook %d: delivery failed unexpectedly", sub.id)
            finally:
                queue.task_done()

    async def _deliver(self, sub: Subscription, job: _Job) -> None:
        assert self._client is not None
        opts = self.options
        error: str | None = None
        status: int | None = None
        attempt = 0
        delivered = False
        while attempt < opts.attempts:
            attempt += 1
            query, body = render(sub.format, sub.secret, job.event, job.payload)
            url = sub.url + (("&" if "?" in sub.url else "?") + query if query else "")
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": "chargewatch-webhook/1",
                SIGNATURE_HEADER: sign(sub.secret, body),
                "X-Chargewatch-Event": job.event,
                "X-Chargewatch-Delivery": str(job.delivery_id),
                "X-Chargewatch-Attempt": str(attempt),
            }
            retry = False
            try:
                response = await self._client.post(url, content=body, headers=headers)
                status = response.status_code
                if 200 <= status < 300:
                    error, retry = _robot_error(sub.format, response)
                    delivered = error is None
                else:
                    error = f"HTTP {status}"
                    retry = status >= 500 or status in (408, 429)
            except httpx.TimeoutException as exc:
                status, error, retry = None, f"timeout: {exc!r}", True
            except httpx.TransportError as exc:
                status, error, retry = None, f"connection: {exc!r}", True
            if delivered or not retry or attempt >= opts.attempts:
                break
            delay = min(opts.backoff_s * 2 ** (attempt - 1), opts.backoff_max_s)
            log.info(
                "webhook %d delivery %d attempt %d failed (%s); retry in %.2fs",
                sub.id, job.delivery_id, attempt, error, delay,
            )  # fmt: skip
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        now = _now_ms()
        if delivered:
            sub.delivered += 1
            sub.consecutive_failures = 0
            sub.failing = False
            sub.last_success_at_ms = now
        else:
            sub.failed += 1
            sub.consecutive_failures += 1
            sub.last_error = error
            sub.last_failure_at_ms = now
            if sub.consecutive_failures >= opts.failing_after and not sub.failing:
                sub.failing = True
                log.warning("webhook %d (%s) is failing: %s", sub.id, sub.url, error)
        for callback in self.on_result:
            callback(delivered)
        await asyncio.to_thread(
            self.store.finish_delivery,
            job.delivery_id,
            status="delivered" if delivered else "failed",
            attempts=attempt,
            http_status=status,
            error=None if delivered else error,
            finished_ms=now,
        )
        if sub.id in self.subscriptions:
            await asyncio.to_thread(self.store.update_webhook, sub.id, sub.record())
