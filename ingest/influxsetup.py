"""``chargewatch influx setup --history URL``: what an InfluxDB history needs for retention.

InfluxDB 1.x (``influx1://``): the database; a retention policy ``raw`` (the default, so
ingest's writes land there) keeping ``--raw-days`` (default 90); a policy ``rollups``
kept forever; and continuous queries that roll each hour of ``raw`` up into ``rollups``:

==================  ========================================  ============================
measurement         from raw                                  per hour, by
==================  ========================================  ============================
``message_hourly``  ``message``: messages (liveness)          device, station, type
``event_hourly``    ``event``: events, energy_wh of them      device, station, type
``port_hourly``     ``port`` samples whose state is           device, station
                    ``available`` (free-port samples)
``slot_hourly``     ``slot`` samples whose state is ``ready``  device, station
``device_hourly``   ``device``: statuses, mean/max temp_c     device, station, kind
==================  ========================================  ============================

InfluxQL cannot judge "online" or opening hours, so 1.x rollups count samples (about one
per heartbeat); the embedded store's rollups (``ingest.rollups``) count minutes. Running it
again is harmless: policies are altered to the asked durations, continuous queries
recreated.

InfluxDB 2.x/3.x (``influx2://``, its management API ``/api/v2``): the URL's bucket keeps
``--raw-days`` (its retention rule); a bucket ``<bucket>_rollups`` kept forever receives the
hourly rollups the service computes and writes itself (``ingest.influxrollups``); and the
two DBRP mappings the InfluxQL reads need: (database, ``autogen``, default) -> the bucket,
(database, ``rollups``) -> the rollups bucket. Run again, it updates what exists.
"""

from __future__ import annotations

import argparse
import logging

from ingest import StoreError
from ingest.influx import InfluxHistory, quote_ident

log = logging.getLogger(__name__)

RAW_RP = "raw"
ROLLUP_RP = "rollups"

# (name, the SELECT ... INTO of one hour; {db} the database)
_HOURLY: tuple[tuple[str, str], ...] = (
    (
        "message_hourly",
        'SELECT count("seq") AS "messages" INTO {db}."rollups"."message_hourly"'
        ' FROM {db}."raw"."message" {where}GROUP BY time(1h), "device", "station", "type"',
    ),
    (
        "event_hourly",
        'SELECT count("seq") AS "events", sum("energy_wh") AS "energy_wh"'
        ' INTO {db}."rollups"."event_hourly" FROM {db}."raw"."event"'
        ' {where}GROUP BY time(1h), "device", "station", "type"',
    ),
    (
        "port_hourly",
        'SELECT count("state") AS "free_samples" INTO {db}."rollups"."port_hourly"'
        ' FROM {db}."raw"."port" WHERE "state" = \'available\' {and_where}'
        'GROUP BY time(1h), "device", "station"',
    ),
    (
        "slot_hourly",
        'SELECT count("state") AS "ready_samples" INTO {db}."rollups"."slot_hourly"'
        ' FROM {db}."raw"."slot" WHERE "state" = \'ready\' {and_where}'
        'GROUP BY time(1h), "device", "station"',
    ),
    (
        "device_hourly",
        'SELECT count("seq") AS "statuses", mean("temp_c") AS "temp_c_mean",'
        ' max("temp_c") AS "temp_c_max" INTO {db}."rollups"."device_hourly"'
        ' FROM {db}."raw"."device" {where}GROUP BY time(1h), "device", "station", "kind"',
    ),
)


def hourly_selects(database: str, where: str = "") -> dict[str, str]:
    """The continuous queries' SELECT ... INTO statements; ``where`` (``time >= ... AND
    time < ...``) makes them a backfill of past hours."""
    db = quote_ident(database)
    return {
        name: sql.format(
            db=db,
            where=f"WHERE {where} " if where else "",
            and_where=f"AND {where} " if where else "",
        )
        for name, sql in _HOURLY
    }


def setup_v1(history: InfluxHistory, raw_days: int) -> list[str]:
    """Create or update the database, policies and continuous queries; the statements run."""
    s = history.settings
    if s.retention_policy and s.retention_policy != RAW_RP:
        raise StoreError(
            f"the URL writes to retention policy {s.retention_policy!r}: drop rp= (writes go to"
            f" the default policy, which setup makes {RAW_RP!r}) or use rp={RAW_RP}"
        )
    db = quote_ident(s.database)
    done: list[str] = []

    def run(q: str) -> None:
        history.execute(q)
        done.append(q)

    run(f"CREATE DATABASE {db}")
    existing = {row["name"] for row in history.query(f"SHOW RETENTION POLICIES ON {db}")}
    for rp, duration, default in ((RAW_RP, f"{raw_days}d", True), (ROLLUP_RP, "INF", False)):
        verb = "ALTER" if rp in existing else "CREATE"
        tail = " DEFAULT" if default else ""
        replication = " REPLICATION 1" if verb == "CREATE" else ""
        run(f"{verb} RETENTION POLICY {quote_ident(rp)} ON {db} DURATION {duration}"
            f"{replication}{tail}")  # fmt: skip
    for name, select in hourly_selects(s.database).items():
        cq = quote_ident(f"cw_{name}")
        try:  # 1.x has no CREATE OR REPLACE, nor DROP ... IF EXISTS
            history.execute(f"DROP CONTINUOUS QUERY {cq} ON {db}")
        except StoreError as exc:
            if "not found" not in str(exc):
                raise
        run(f"CREATE CONTINUOUS QUERY {cq} ON {db} BEGIN {select} END")
    return done


def setup_v2(history: InfluxHistory, raw_days: int) -> list[str]:
    """Buckets, retention and DBRP mappings of a 2.x/3.x history (module docstring); what
    was done, one line each."""
    s = history.settings
    done: list[str] = []
    orgs = history.api("GET", "/api/v2/orgs", params={"org": s.org}).get("orgs", [])
    org_id = next((o["id"] for o in orgs if o.get("name") == s.org), None)
    if org_id is None:
        raise StoreError(f"InfluxDB has no organisation {s.org!r} (the URL's org=)")

    def bucket(name: str, every_s: int) -> str:
        rules = [{"type": "expire", "everySeconds": every_s}] if every_s else []
        found = history.api("GET", "/api/v2/buckets", params={"orgID": org_id, "name": name})
        existing = [b for b in found.get("buckets", []) if b.get("name") == name]
        if existing:
            bucket_id = str(existing[0]["id"])
            history.api("PATCH", f"/api/v2/buckets/{bucket_id}", body={"retentionRules": rules})
            done.append(f"bucket {name}: retention {every_s // 86_400 or 'forever'}"
                        f"{' days' if every_s else ''} (updated)")  # fmt: skip
            return bucket_id
        made = history.api("POST", "/api/v2/buckets",
                           body={"orgID": org_id, "name": name, "retentionRules": rules})  # fmt: skip
        done.append(f"bucket {name}: retention {every_s // 86_400 or 'forever'}"
                    f"{' days' if every_s else ''} (created)")  # fmt: skip
        return str(made["id"])

    def dbrp(bucket_id: str, rp: str, default: bool) -> None:
        query = {"orgID": org_id, "db": s.database, "rp": rp}
        found = history.api("GET", "/api/v2/dbrps", params=query).get("content", [])
        if any(m.get("bucketID") == bucket_id for m in found):
            done.append(f"dbrp {s.database}/{rp} -> bucket {bucket_id} (exists)")
            return
        history.api("POST", "/api/v2/dbrps", body={
            "orgID": org_id, "bucketID": bucket_id, "database": s.database,
            "retention_policy": rp, "default": default,
        })  # fmt: skip
        done.append(f"dbrp {s.database}/{rp} -> bucket {bucket_id} (created)")

    raw = bucket(s.bucket, raw_days * 86_400)
    rollups = bucket(f"{s.bucket}_rollups", 0)
    dbrp(raw, "autogen", True)
    dbrp(rollups, ROLLUP_RP, False)
    return done


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    influx = sub.add_parser("influx", help="InfluxDB history: retention and rollups")
    steps = influx.add_subparsers(dest="influx_command", required=True)
    setup = steps.add_parser("setup", help=__doc__.splitlines()[0] if __doc__ else None)
    setup.add_argument("--history", required=True, help="influx1://… or influx2://… URL")
    setup.add_argument(
        "--raw-days", type=int, default=90, help="days raw history is kept (default 90)"
    )


def command(args: argparse.Namespace) -> int:
    if not 1 <= args.raw_days <= 36_500:
        print("chargewatch influx setup: --raw-days from 1 to 36500")
        return 2
    try:
        history = InfluxHistory(args.history)
    except StoreError as exc:
        print(f"chargewatch influx setup: {exc}")
        return 2
    try:
        setup = setup_v2 if history.settings.mode == "v2" else setup_v1
        for done in setup(history, args.raw_days):
            print(done)
    except StoreError as exc:
        print(f"chargewatch influx setup: {exc}")
        return 1
    finally:
        history.close()
    return 0
