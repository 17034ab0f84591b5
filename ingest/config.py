"""Ingest options. Every option has a default and a reason (README, "Configuration")."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from devices.topics import DEFAULT_PREFIX
from ingest.alerts.config import AlertsConfig
from ingest.commands.config import CommandsConfig


class BatteriesConfig(BaseModel):
    # Send lock_battery for the slot of a flagged pack (when it is flagged and wherever it
    # appears), so a cabinet does not release it to a rider (ingest.passports).
    lock_flagged: bool = True


class IngestConfig(BaseModel):
    # None: start the embedded broker (amqtt) so a bare machine works.
    broker: str | None = None
    # CA file that verifies an mqtts:// broker's certificate (None: the system's CAs).
    cafile: Path | None = None
    # Port of the embedded broker; 0 picks a free one (printed at start).
    embedded_broker_port: int = Field(default=1883, ge=0, le=65535)
    # Loopback: devices elsewhere need credentials first (anything else is refused without).
    embedded_broker_host: str = "127.0.0.1"
    # credentials.json of `chargewatch broker-config mosquitto`: the embedded broker then
    # authenticates every client and enforces the same topic rules as the mosquitto ACL.
    embedded_broker_credentials: Path | None = None
    # MQTT client library of the ingest source; both acknowledge only after the store has
    # the message. gmqtt: about 1.7x the pipeline's msg/s of paho (docs/benchmarks.md, 1).
    mqtt_client: Literal["paho", "gmqtt"] = "gmqtt"
    # Fixed so the broker keeps our persistent session across restarts.
    client_id: str = "chargewatch-ingest"
    topic_prefix: str = DEFAULT_PREFIX
    # History store URL: None keeps history in the embedded store; influx2://host:port?org=
    # &bucket=&token= (InfluxDB 2.x/3.x) or influx1://host:port?db= (1.x), see docs/operations.md
    history: str | None = None
    # The state database: None keeps it in the embedded file of the data dir (one machine);
    # sqlite:///path names that file; postgresql://user@host/db puts it in PostgreSQL (several
    # processes share it; migrated by `chargewatch db upgrade`, see ingest.statedb)
    db: str | None = None
    # Where the embedded store keeps its file (state always; history unless `history` is set).
    data_dir: Path = Path("chargewatch-data")
    # None: the district shipped with the package.
    catalog: Path | None = None
    # Unacked messages held at once: enough to batch well (one store write per ~1000
    # messages), small enough to bound memory (1000 x 16 KiB worst case = 16 MiB).
    max_inflight: int = Field(default=1000, ge=1, le=65535)
    # Most messages written in one store transaction.
    batch_max: int = Field(default=1000, ge=1)
    # Cap of the store retry backoff.
    store_retry_max_s: float = Field(default=30.0, gt=0)
    # A store write still waiting after this long (a lock held elsewhere, a full or slow
    # disk) fails /readyz and raises the store_unavailable alert at once, instead of after
    # SQLite's 10 s busy timeout: nothing is acknowledged meanwhile. Normal batches take ms.
    store_stuck_s: float = Field(default=2.0, gt=0)
    # Dead letters kept for inspection (counts per reason are kept forever).
    dead_letters_kept: int = Field(default=10_000, ge=10)
    # SQLite durability: FULL survives power loss, NORMAL only process crashes.
    sqlite_synchronous: str = Field(default="FULL", pattern="^(FULL|NORMAL|EXTRA)$")
    # Watchdog: connected but silent for this many heartbeats while devices should be
    # reporting means a silent stall (a broker blip that left us subscribed to nothing).
    watchdog_heartbeats: float = Field(default=3.0, gt=0)
    # Release level: a cabinet slot counts as a ready battery at or above this soc
    # (a device's catalog entry may set its own).
    release_soc: float = Field(default=90.0, ge=1, le=100)
    # How often the data dir's size and its disk's free space are measured (ingest.diskusage).
    disk_check_s: float = Field(default=60.0, gt=0)
    # Free space's shrink rate is measured over this long: hours smooth out a burst, and a
    # restart forgets it (the projection waits for a tenth of it again).
    disk_growth_window_s: float = Field(default=6 * 3600.0, gt=0)
    # A warning alert when the disk is projected full in fewer days than this: time to
    # order a disk or shorten retention before ingest stops acknowledging.
    disk_full_warning_days: float = Field(default=7.0, gt=0)
    # Raw history (every message, byte-exact) of the embedded store is kept this many days
    # of device time; older history is deleted in the background, in small batches.
    history_days: float = Field(default=90.0, gt=0, le=36_500)
    # Statuses of an hour of device time are compacted (one zlib block per device and hour,
    # ~20x smaller) this long after the hour ended: late messages still land before it.
    compact_grace_s: float = Field(default=600.0, ge=0, le=86_400)
    # How often compaction and retention run (the first pass one period after start).
    housekeeping_s: float = Field(default=300.0, gt=0, le=86_400)
    # Alert rules, lifecycle, webhooks and rider reports (docs/alerts.md).
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    # Battery passports: flagged packs (docs/alerts.md, "Battery passports").
    batteries: BatteriesConfig = Field(default_factory=BatteriesConfig)
    # Remote commands to devices (contract v1.1, docs/commands.md).
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
