-- The tables the stores created themselves before migrations (main at 694623a), verbatim:
-- a file made by that code, which ingest.db.migrate adopts.

-- ingest/sqlite_store.py
CREATE TABLE IF NOT EXISTS messages (
    device_id   TEXT    NOT NULL,
    boot        TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    station_id  TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    ts_ms       INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    payload     TEXT    NOT NULL
);
-- a rowid table with a unique index, not WITHOUT ROWID: rows carry a ~0.3-1 KiB payload,
-- and inserting them into a clustered index measured 4x slower (50 vs 13 us a row)
CREATE UNIQUE INDEX IF NOT EXISTS messages_key ON messages (device_id, boot, seq, type);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (device_id, ts_ms);
-- housekeeping's reads by time (statuses to compact, history past retention, who spoke in
-- an hour) without scanning the table while ingest waits for the connection
CREATE INDEX IF NOT EXISTS messages_by_type_time ON messages (type, ts_ms);
CREATE TABLE IF NOT EXISTS twins (
    device_id TEXT PRIMARY KEY,
    record    TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    topic       TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    detail      TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    size        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter_counts (
    reason TEXT PRIMARY KEY,
    count  INTEGER NOT NULL
) WITHOUT ROWID;
-- what was dead-lettered, by digest of (topic, size, payload kept): a retained message
-- replayed on every subscribe is recognised and counted here instead of stored again
CREATE TABLE IF NOT EXISTS dead_letter_digests (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    digest  BLOB    NOT NULL UNIQUE,
    repeats INTEGER NOT NULL DEFAULT 0
);
-- the statuses of one device and hour of device time, once the hour is over: a zlib'd JSON
-- list of [boot, seq, ts_ms, received_ms, station_id, kind, payload], by (ts_ms, seq)
CREATE TABLE IF NOT EXISTS status_blocks (
    device_id TEXT    NOT NULL,
    hour_ms   INTEGER NOT NULL,
    statuses  INTEGER NOT NULL,
    data      BLOB    NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS status_blocks_key ON status_blocks (device_id, hour_ms);
CREATE INDEX IF NOT EXISTS status_blocks_by_hour ON status_blocks (hour_ms);
-- hourly rollups (devices.rollup) of a device or a station, kept for years
CREATE TABLE IF NOT EXISTS rollups (
    scope   TEXT    NOT NULL,
    id      TEXT    NOT NULL,
    hour_ms INTEGER NOT NULL,
    data    TEXT    NOT NULL,
    PRIMARY KEY (scope, id, hour_ms)
) WITHOUT ROWID;
-- facts the service must remember across restarts (e.g. that the broker gave us a session)
CREATE TABLE IF NOT EXISTS facts (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS unobserved (
    id          INTEGER PRIMARY KEY,
    device_id   TEXT    NOT NULL,
    received_ms INTEGER NOT NULL,
    payload     TEXT    NOT NULL
);

-- ingest/alerts/store.py
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, rule TEXT NOT NULL, code TEXT NOT NULL, severity TEXT NOT NULL,
    status TEXT NOT NULL, station_id TEXT NOT NULL, device_id TEXT, unit INTEGER,
    unit_kind TEXT, opened_at_ms INTEGER NOT NULL, last_seen_at_ms INTEGER NOT NULL,
    count INTEGER NOT NULL, last_value REAL, info TEXT, acknowledged_at_ms INTEGER,
    acknowledged_by TEXT, resolved_at_ms INTEGER, resolved_by TEXT, resolved_how TEXT,
    clearing_since_ms INTEGER, escalation_level INTEGER NOT NULL, escalated_at_ms INTEGER,
    parent_id INTEGER, suppressed INTEGER NOT NULL, notified INTEGER NOT NULL,
    reports INTEGER NOT NULL, auto_resolve INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_status ON alerts (status, id);
CREATE INDEX IF NOT EXISTS alerts_by_device ON alerts (device_id, id);
CREATE INDEX IF NOT EXISTS alerts_by_station ON alerts (station_id, id);
CREATE TABLE IF NOT EXISTS alert_events (
    id INTEGER PRIMARY KEY, alert_id INTEGER NOT NULL, type TEXT NOT NULL,
    at_ms INTEGER NOT NULL, data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, alert_id INTEGER NOT NULL, at_ms INTEGER NOT NULL,
    author TEXT NOT NULL, source TEXT NOT NULL, text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_by_alert ON alert_notes (alert_id, id);
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, webhook_id INTEGER NOT NULL,
    alert_id INTEGER NOT NULL, event TEXT NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL, http_status INTEGER, error TEXT,
    created_at_ms INTEGER NOT NULL, finished_at_ms INTEGER, body TEXT NOT NULL,
    next_try_at_ms INTEGER, deadline_at_ms INTEGER, last_attempt_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS deliveries_by_alert ON deliveries (alert_id, id);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (status);

-- ingest/alerts/order_store.py
CREATE TABLE IF NOT EXISTS work_orders (
    id INTEGER PRIMARY KEY, alert_id INTEGER NOT NULL, station_id TEXT NOT NULL,
    device_id TEXT, rule TEXT NOT NULL, code TEXT NOT NULL, severity TEXT NOT NULL,
    state TEXT NOT NULL, assignee TEXT, created_by TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, due_at_ms INTEGER NOT NULL, assigned_at_ms INTEGER,
    on_site_at_ms INTEGER, on_site_how TEXT, fixed_at_ms INTEGER, closed_at_ms INTEGER,
    closed_by TEXT, overdue_notices INTEGER NOT NULL, overdue_at_ms INTEGER,
    updated_at_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS work_orders_one_per_alert
    ON work_orders (alert_id) WHERE state != 'closed';
CREATE INDEX IF NOT EXISTS work_orders_by_state ON work_orders (state, id);
CREATE TABLE IF NOT EXISTS work_order_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, order_id INTEGER NOT NULL, at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL, what TEXT NOT NULL, note TEXT
);
CREATE INDEX IF NOT EXISTS work_order_log_by_order ON work_order_log (order_id, id);

-- ingest/passport_store.py
CREATE TABLE IF NOT EXISTS battery (
    serial TEXT PRIMARY KEY, flagged INTEGER NOT NULL DEFAULT 0, flagged_at_ms INTEGER,
    flag_reason TEXT, max_temp_c REAL, max_rise_c_per_min REAL, first_seen_ms INTEGER NOT NULL,
    device_id TEXT, slot INTEGER, since_ms INTEGER
);
CREATE INDEX IF NOT EXISTS battery_flagged ON battery (flagged, serial);
CREATE TABLE IF NOT EXISTS battery_stays (
    id INTEGER PRIMARY KEY, serial TEXT NOT NULL, device_id TEXT NOT NULL,
    slot INTEGER NOT NULL, from_ms INTEGER NOT NULL, to_ms INTEGER
);
CREATE INDEX IF NOT EXISTS stays_by_serial ON battery_stays (serial, from_ms);
CREATE TABLE IF NOT EXISTS battery_events (
    id INTEGER PRIMARY KEY, serial TEXT NOT NULL, kind TEXT NOT NULL, alert_id INTEGER,
    at_ms INTEGER NOT NULL, device_id TEXT, slot INTEGER, detail TEXT
);
CREATE INDEX IF NOT EXISTS battery_events_by_serial ON battery_events (serial, id);
CREATE TABLE IF NOT EXISTS battery_clearances (
    id INTEGER PRIMARY KEY, serial TEXT NOT NULL, at_ms INTEGER NOT NULL,
    actor_id TEXT NOT NULL, actor_name TEXT NOT NULL, note TEXT NOT NULL,
    flagged_at_ms INTEGER, flag_reason TEXT
);
CREATE INDEX IF NOT EXISTS clearances_by_serial ON battery_clearances (serial, id);

-- ingest/commands/store.py
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, device_id TEXT NOT NULL, station_id TEXT NOT NULL,
    type TEXT NOT NULL, unit INTEGER, state TEXT NOT NULL, requested_by TEXT NOT NULL,
    requested_key TEXT, requested_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL,
    payload TEXT NOT NULL, sends INTEGER NOT NULL, sent_at_ms INTEGER,
    last_sent_at_ms INTEGER, result TEXT, info TEXT, result_at_ms INTEGER,
    late_result TEXT, late_info TEXT, late_result_at_ms INTEGER, repeats INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device_id, requested_at_ms);
CREATE INDEX IF NOT EXISTS commands_by_time ON commands (requested_at_ms);
CREATE INDEX IF NOT EXISTS commands_by_state ON commands (state);

-- api/auth.py
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, hash TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER, expires_at_ms INTEGER
) WITHOUT ROWID;

-- api/sentinels.py
CREATE TABLE IF NOT EXISTS riders (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL, nickname TEXT NOT NULL,
    station_id TEXT NOT NULL, created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rider_reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rider_id TEXT, station_id TEXT NOT NULL,
    device_id TEXT, unit INTEGER, unit_kind TEXT, category TEXT NOT NULL, text TEXT NOT NULL,
    alert_id INTEGER NOT NULL, at_ms INTEGER NOT NULL, outcome TEXT NOT NULL,
    decided_at_ms INTEGER, decided_by TEXT, decided_role TEXT, decision_note TEXT,
    confirmed_by_alert INTEGER, duplicate_of INTEGER, no_points TEXT
);
CREATE INDEX IF NOT EXISTS rider_reports_by_rider ON rider_reports (rider_id, id);
CREATE INDEX IF NOT EXISTS rider_reports_by_outcome ON rider_reports (outcome, id);
CREATE INDEX IF NOT EXISTS rider_reports_by_station ON rider_reports (station_id, id);
CREATE TABLE IF NOT EXISTS rider_points (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rider_id TEXT NOT NULL, delta INTEGER NOT NULL,
    reason TEXT NOT NULL, note TEXT, report_id INTEGER, alert_id INTEGER,
    incident_id INTEGER, reverses INTEGER, at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL, actor_role TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rider_points_by_rider ON rider_points (rider_id, id);
CREATE INDEX IF NOT EXISTS rider_points_by_report ON rider_points (report_id);
CREATE UNIQUE INDEX IF NOT EXISTS rider_points_once_per_incident
    ON rider_points (rider_id, incident_id) WHERE reverses IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS rider_points_reversed_once
    ON rider_points (reverses) WHERE reverses IS NOT NULL;

-- api/audit.py
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL,
    actor_id TEXT NOT NULL, actor_name TEXT NOT NULL, actor_role TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_actor ON audit_log (actor_id, id);
CREATE INDEX IF NOT EXISTS audit_by_action ON audit_log (action, id);
