"""Alert options, nested in ``IngestConfig.alerts`` (env ``CHARGEWATCH_INGEST__ALERTS__*``).

Every option has a default and one line of rationale; docs/alerts.md explains the
thresholds at length.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class KindLimits(BaseModel):
    """Thresholds and durations for one device kind (pile or cabinet)."""

    # Enclosure temperature (device ``temp_c``) above which a critical alert opens.
    temp_high_c: float = 60.0
    # Slot (battery) temperature above which a critical alert opens; cabinets only.
    unit_temp_high_c: float = 60.0
    # A temperature rising this fast (°C per minute, device clock per rule_time) is critical.
    temp_rise_c_per_min: float = Field(default=2.0, gt=0)
    # The rise is measured over readings at most this old ...
    temp_rise_window_s: float = Field(default=300.0, gt=0)
    # ... spanning at least this long (two readings a second apart are noise, not a trend).
    temp_rise_min_span_s: float = Field(default=60.0, gt=0)
    # A port "charging" below this power counts as delivering nothing.
    charging_min_w: float = Field(default=5.0, ge=0)
    # ... and opens an alert once that lasted this long (BMS pauses last a few minutes).
    charging_no_power_s: float = Field(default=600.0, gt=0)
    # A cabinet maintenance door open this long opens an alert (a swap visit takes minutes).
    door_open_s: float = Field(default=600.0, gt=0)
    # A counter that falls by more than this (Wh) within one session is "going backwards".
    energy_backwards_wh: float = Field(default=1.0, ge=0)


class PileLimits(KindLimits):
    """A pile's own defaults, kept when only some options are set (env, file)."""

    # A pile's electronics sit in the sun: 40 °C air + sun load + self-heating reach ~65 °C.
    temp_high_c: float = 75.0
    temp_rise_c_per_min: float = Field(default=3.0, gt=0)


class WebhookOptions(BaseModel):
    # One POST may take this long before it counts as failed (and is retried).
    timeout_s: float = Field(default=5.0, gt=0)
    # A notification is retried this long after it was raised, then given up as `expired`
    # (logged, counted, listed in the console): long enough for a receiver's night outage.
    deadline_s: float = Field(default=6 * 3600.0, gt=0)
    # First retry delay; doubled per attempt, jittered, capped by backoff_max_s ...
    backoff_s: float = Field(default=1.0, gt=0)
    # ... so a dead receiver gets one retry per waiting notification every 2.5-5 min; the
    # first success (a fresh notification, or any retry) sends the waiting ones at once.
    backoff_max_s: float = Field(default=300.0, gt=0)
    # At most this many attempts per notification before its deadline (0: no limit).
    attempts: int = Field(default=0, ge=0)
    # Failed attempts in a row before a subscription is marked failing (API, metric).
    failing_after: int = Field(default=3, ge=1)
    # Notifications waiting per subscription (in memory and in the store's outbox); beyond
    # it the oldest is dropped (logged, counted, listed): bounds memory in a long outage.
    queue_max: int = Field(default=10_000, ge=1)
    # The console's public address (https://ops.example.cn): notifications then carry a link
    # to the alert (`url`, and a line in chat messages). None: no link (we cannot guess it).
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s()<>\[\]]+$")
    # The language of chat messages and of the JSON `title`/`summary`: Chinese, the
    # maintainers' own; "en" for English. A subscription's `language` overrides it.
    language: Literal["zh", "en"] = "zh"


class ReportOptions(BaseModel):
    # Longest rider text kept (a hazard report is a sentence or two).
    text_max: int = Field(default=500, ge=1, le=10_000)
    # Reports one client may send at once ...
    burst: int = Field(default=3, ge=1)
    # ... and then per hour (token bucket): a sentinel, not a spammer.
    per_hour: float = Field(default=10.0, gt=0)
    # Reports about one station from everyone together, at once and then per hour: a flood
    # from many addresses joins one alert anyway, the caps bound the notes it writes.
    station_burst: int = Field(default=10, ge=1)
    station_per_hour: float = Field(default=30.0, gt=0)
    # Reports to the whole service, at once and then per hour.
    total_burst: int = Field(default=30, ge=1)
    total_per_hour: float = Field(default=120.0, gt=0)
    # Reports one registered rider may send at once, then per hour, from any address: a
    # token does not buy a rider more than an address gets.
    rider_burst: int = Field(default=3, ge=1)
    rider_per_hour: float = Field(default=10.0, gt=0)


class PointRates(BaseModel):
    """Points a confirmed report earns, per category: hazards that page someone most."""

    smoke: int = Field(default=20, ge=0, le=1000)
    fire: int = Field(default=20, ge=0, le=1000)
    water: int = Field(default=15, ge=0, le=1000)
    heat: int = Field(default=10, ge=0, le=1000)
    damage: int = Field(default=5, ge=0, le=1000)
    not_working: int = Field(default=3, ge=0, le=1000)
    blocked: int = Field(default=2, ge=0, le=1000)
    other: int = Field(default=1, ge=0, le=1000)


class SentinelOptions(BaseModel):
    """Registered riders ("sentinels") and their points (docs/alerts.md, "Sentinels")."""

    # A report is confirmed by telemetry when an alert of the rules opens at its place this
    # close to it (before or after); past it, a report nobody confirmed is `expired`.
    confirm_window_s: float = Field(default=1800.0, gt=0, le=7 * 86400)
    points: PointRates = Field(default_factory=PointRates)
    # Registrations from one client address at once, then per hour: riders register at a
    # station, often many behind its one Wi-Fi address; raise it for a registration day.
    register_burst: int = Field(default=10, ge=1)
    register_per_hour: float = Field(default=30.0, gt=0)


class WorkOrderOptions(BaseModel):
    # A work order is due this long after it is created, by its alert's severity: a
    # critical fault (smoke, a ground fault) needs someone within the hour, a minor one
    # within the working day. An order's own `due_at` overrides it.
    due_critical_s: float = Field(default=3600.0, gt=0)
    due_major_s: float = Field(default=4 * 3600.0, gt=0)
    due_minor_s: float = Field(default=24 * 3600.0, gt=0)
    due_warning_s: float = Field(default=72 * 3600.0, gt=0)
    # How often the timer looks for overdue orders (a minute late is no news).
    check_s: float = Field(default=30.0, gt=0)
    # An overdue order is notified again this long after the last notice (0: once only) ...
    repeat_s: float = Field(default=3600.0, ge=0)
    # ... at most this many notices per order.
    notices_max: int = Field(default=3, ge=1, le=100)

    def due_after_s(self, severity: str) -> float:
        value: float = getattr(self, f"due_{severity}_s", self.due_warning_s)
        return value


class AlertsConfig(BaseModel):
    # Off: no rules run, no alerts, no webhooks (the API still answers, with nothing).
    enabled: bool = True
    # How often absences are checked (offline, stuck, door, station rules, escalation).
    tick_s: float = Field(default=1.0, gt=0)
    # After start, absence rules wait this long: the broker redelivers what we missed first.
    startup_grace_s: float = Field(default=15.0, ge=0)
    # A condition must stay clear this long before its alert resolves itself; one that
    # returns within it reopens the same alert (no flapping storms).
    verify_s: float = Field(default=300.0, ge=0)
    pile: PileLimits = Field(default_factory=PileLimits)
    cabinet: KindLimits = Field(default_factory=KindLimits)
    # No free port and no ready battery at an open station for this long: riders turned away.
    station_unavailable_s: float = Field(default=900.0, gt=0)
    # This share of a station's (ever seen) devices offline is one station incident ...
    station_offline_share: float = Field(default=0.5, gt=0, le=1)
    # ... provided at least this many are offline (two piles rebooting are no incident).
    station_offline_min: int = Field(default=3, ge=1)
    # Unacknowledged alerts are sent again to escalation targets after this long (0: never).
    escalate_critical_s: float = Field(default=300.0, ge=0)
    escalate_major_s: float = Field(default=1800.0, ge=0)
    escalate_minor_s: float = Field(default=0.0, ge=0)
    escalate_warning_s: float = Field(default=0.0, ge=0)
    # Escalations per alert at most (one every escalate_*_s).
    escalate_max: int = Field(default=3, ge=1)
    # Alert change events kept for SSE replay (Last-Event-ID older than that gets a reset).
    events_kept: int = Field(default=100_000, ge=100)
    # SSE comment line so proxies keep an idle stream open.
    sse_keepalive_s: float = Field(default=15.0, gt=0)
    webhooks: WebhookOptions = Field(default_factory=WebhookOptions)
    reports: ReportOptions = Field(default_factory=ReportOptions)
    work_orders: WorkOrderOptions = Field(default_factory=WorkOrderOptions)
    sentinels: SentinelOptions = Field(default_factory=SentinelOptions)

    def limits(self, kind: str) -> KindLimits:
        return self.pile if kind == "pile" else self.cabinet

    def escalate_after_s(self, severity: str) -> float:
        value: float = getattr(self, f"escalate_{severity}_s", 0.0)
        return value
