"""Sentinels: riders register (no phone numbers), their reports are confirmed by telemetry
or a maintainer, rejected or expired, and earn points in a ledger once per incident; abuse
is refused (rate limits per rider and address, forged tokens, duplicates, reversals).
In-process through the whole ASGI app, a real AlertEngine on a fake clock and SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.auth import KeyStore
from api.settings import ServeSettings
from devices.catalog import Catalog
from ingest.alerts.config import (
    AlertsConfig,
    PointRates,
    ReportOptions,
    SentinelOptions,
)
from ingest.alerts.engine import AlertEngine
from ingest.alerts.model import REPORT_CATEGORIES
from ingest.alerts.store import AlertStore
from ingest.config import IngestConfig
from ingest.inprocess import read_and_act
from ingest.service import Ingest
from tests.alerts.helpers import Clock, Device
from tests.security.inprocess import bearer

STATION = "yungu-road"
OTHER = "ziyun-road"
CABINET = "YGR-C01"
PILE = "YGR-P01"
WINDOW_S = 600
SMOKE_POINTS = 7


@dataclass
class App:
    app: Any
    http: httpx.AsyncClient
    engine: AlertEngine
    clock: Clock
    data_dir: Path

    def key(self, role: str = "maintainer", name: str = "li-wei") -> dict[str, str]:
        store = KeyStore.in_dir(self.data_dir)
        try:
            return bearer(store.create(name, role)[1])
        finally:
            store.close()

    def client(self, address: str) -> httpx.AsyncClient:
        """Another client of the same app, from ``address``."""
        transport = httpx.ASGITransport(app=self.app, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://testserver")

    async def register(self, nickname: str = "小王", station: str = STATION) -> dict[str, str]:
        r = await self.http.post("/v1/riders", json={"station_id": station, "nickname": nickname})
        assert r.status_code == 201, r.text
        return {"Authorization": f"Rider {r.json()['token']}"}

    async def report(
        self, rider: dict[str, str] | None, http: httpx.AsyncClient | None = None, **body: Any
    ) -> dict[str, Any]:
        body = {"station": STATION, "category": "smoke", **body}
        r = await (http or self.http).post("/v1/reports", json=body, headers=rider or {})
        assert r.status_code == 201, r.text
        answer: dict[str, Any] = r.json()
        return answer

    async def mine(self, rider: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        me = await self.http.get("/v1/riders/me", headers=rider)
        assert me.status_code == 200, me.text
        reports = await self.http.get("/v1/riders/me/reports", headers=rider)
        assert reports.status_code == 200, reports.text
        return me.json(), reports.json()["reports"]


@asynccontextmanager
async def sentinels(tmp_path: Path, **options: Any) -> AsyncIterator[App]:
    data_dir = tmp_path / "data"
    alerts = AlertsConfig(
        tick_s=3600,
        startup_grace_s=0,
        # generous limits unless a test is about them
        reports=ReportOptions(**{"burst": 50, "rider_burst": 50, **options.pop("reports", {})}),
        sentinels=SentinelOptions(
            confirm_window_s=WINDOW_S,
            points=PointRates(smoke=SMOKE_POINTS, blocked=2),
            **options,
        ),
    )
    config = IngestConfig(data_dir=data_dir, alerts=alerts)
    catalog = Catalog.load()
    ingest = Ingest(config, catalog)
    clock = Clock()
    async with AsyncExitStack() as stack:
        store = AlertStore.in_dir(data_dir)
        stack.callback(store.close)
        await stack.enter_async_context(ingest.supervisor)  # as Ingest enters it
        engine = AlertEngine(alerts, catalog, ingest.twins, store, clock=clock,
                             supervisor=ingest.supervisor)  # fmt: skip
        ingest.alerts = await stack.enter_async_context(engine)
        app = create_app(*read_and_act(ingest), ServeSettings())
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://testserver")
        )
        yield App(app, http, engine, clock, data_dir)


# -- registration --------------------------------------------------------------------------


async def test_register_shows_the_token_once_and_keeps_only_its_hash(tmp_path: Path) -> None:
    async with sentinels(tmp_path) as s:
        r = await s.http.post("/v1/riders", json={"station_id": STATION, "nickname": " 小王 "})
        assert r.status_code == 422, "a nickname is kept as typed: no leading space"
        r = await s.http.post("/v1/riders", json={"station_id": STATION, "nickname": "小王"})
        assert r.status_code == 201, r.text
        created = r.json()
        token = created["token"]
        assert token.startswith(f"cwr_{created['rider_id']}_")
        assert (created["nickname"], created["station_id"]) == ("小王", STATION)
        secret = token.rsplit("_", 1)[1]
        stored = b"".join(p.read_bytes() for p in s.data_dir.glob("chargewatch.db*"))
        assert secret.encode() not in stored
        assert created["rider_id"].encode() in stored
        assert r.headers["cache-control"] == "no-store", "the token is in this answer"
        for path in ("/v1/riders/me", "/v1/riders/me/reports"):
            r = await s.http.get(path, headers={"Authorization": f"Rider {token}"})
            assert r.headers["cache-control"] == "no-store", path
            assert "Authorization" in r.headers["vary"], path
        me, reports = await s.mine({"Authorization": f"Rider {token}"})
        assert (me["rider_id"], me["nickname"], me["points"], me["ledger"]) == (
            created["rider_id"], "小王", 0, [],
        )  # fmt: skip
        assert reports == []
        assert "token" not in me
        r = await s.http.post("/v1/riders", json={"station_id": "nowhere", "nickname": "x"})
        assert r.status_code == 404


@pytest.mark.parametrize(
    "nickname",
    [
        "13800138000",
        "王 138 0013 8000",
        "138-0013-8000",
        "+86 (138) 0013.8000",
        "(0551)6288 1234",
        "１３８００１３８０００",  # full-width
        "一三八零零一三八零零零",  # Chinese numerals
        "١٣٨٠٠١٣٨٠٠٠",  # Arabic-Indic digits
        "1 3 8 0 0 1 3 8",
    ],
)
async def test_a_nickname_that_looks_like_a_phone_number_is_refused(
    tmp_path: Path, nickname: str
) -> None:
    async with sentinels(tmp_path) as s:
        r = await s.http.post("/v1/riders", json={"station_id": STATION, "nickname": nickname})
        assert r.status_code == 422, r.text
        problem = r.json()["detail"][0]
        assert problem["field"] == "body.nickname"
        assert "phone number" in problem["problem"]
        stored = b"".join(p.read_bytes() for p in s.data_dir.glob("chargewatch.db*"))
        assert nickname.encode() not in stored


@pytest.mark.parametrize(
    ("nickname", "ok"),
    [
        ("骑手小王2号", True),
        ("Rider 007", True),
        ("A1B2C3D4E5F6", True),
        ("123456", True),  # six digits: not a phone number
        ("x" * 24, True),
        ("x" * 25, False),
        ("wang\u202eoaix", False),  # a bidi override
        ("wang\u200b", False),  # invisible
        ("two\nlines", False),
    ],
)
async def test_nickname_rules(tmp_path: Path, nickname: str, ok: bool) -> None:
    async with sentinels(tmp_path) as s:
        r = await s.http.post("/v1/riders", json={"station_id": STATION, "nickname": nickname})
        assert r.status_code == (201 if ok else 422), r.text


async def test_registration_is_rate_limited_per_address(tmp_path: Path) -> None:
    async with sentinels(tmp_path, register_burst=2) as s:
        for i in range(2):
            await s.register(f"rider{i}")
        r = await s.http.post("/v1/riders", json={"station_id": STATION, "nickname": "r3"})
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) > 0
        async with s.client("10.9.8.7") as other:
            r = await other.post("/v1/riders", json={"station_id": STATION, "nickname": "r3"})
            assert r.status_code == 201, "another address has its own bucket"


# -- tokens --------------------------------------------------------------------------------


async def test_a_forged_or_unknown_rider_token_is_refused_not_taken_for_anonymous(
    tmp_path: Path,
) -> None:
    async with sentinels(tmp_path) as s:
        good = await s.register()
        rider_id = good["Authorization"].split("_")[1]
        forged = [
            {"Authorization": f"Rider cwr_{rider_id}_not-the-secret"},
            {"Authorization": "Rider cwr_deadbeef_whatever"},
            {"Authorization": "Rider garbage"},
            {"Authorization": "Rider "},
            {"Authorization": good["Authorization"].replace("Rider", "Bearer")},
            s.key(),  # a maintainer's key is not a rider
        ]
        for headers in forged:
            r = await s.http.post(
                "/v1/reports", json={"station": STATION, "category": "smoke"}, headers=headers
            )
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"] == "Rider"
            for path in ("/v1/riders/me", "/v1/riders/me/reports"):
                assert (await s.http.get(path, headers=headers)).status_code == 401, path
        # nothing was reported by the refused requests
        listed = await s.http.get("/v1/reports", headers=s.key())
        assert listed.json()["reports"] == []
        for path in ("/v1/riders/me", "/v1/riders/me/reports"):
            assert (await s.http.get(path)).status_code == 401
        # anonymous still works, and is nobody's
        anonymous = await s.report(None)
        assert anonymous["outcome"] == "pending"
        _, reports = await s.mine(good)
        assert reports == []


# -- rate limits ---------------------------------------------------------------------------


async def test_rate_limits_per_rider_and_per_address(tmp_path: Path) -> None:
    limits = {"rider_burst": 2, "rider_per_hour": 1, "burst": 3, "per_hour": 1}
    async with sentinels(tmp_path, reports=limits) as s:
        rider = await s.register()
        await s.report(rider, category="blocked")
        await s.report(rider, category="blocked")
        # a fresh address does not give the rider more
        async with s.client("10.0.0.2") as other:
            r = await other.post(
                "/v1/reports", json={"station": OTHER, "category": "other"}, headers=rider
            )
            assert r.status_code == 429, r.text
            assert r.json()["detail"] == "too many reports from this rider"
            assert int(r.headers["retry-after"]) > 0
            # ... and a refused report took from no bucket: the address still has its burst
            riders = [await s.register(f"r{i}") for i in range(4)]
            for i in range(3):
                await s.report(riders[i], http=other, category="other", station=OTHER)
            # a fresh rider does not give the address more
            r = await other.post(
                "/v1/reports", json={"station": OTHER, "category": "other"}, headers=riders[3]
            )
            assert r.status_code == 429, r.text
            assert r.json()["detail"] == "too many reports from this client"


# -- outcomes and points -------------------------------------------------------------------


async def test_maintainer_confirms_once_per_incident_rejects_and_reverses(tmp_path: Path) -> None:
    async with sentinels(tmp_path) as s:
        maint, admin = s.key(), s.key("admin", "ops-lead")
        rider = await s.register()
        other = await s.register("老李")
        first = await s.report(rider, text="冒烟了")
        again = await s.report(rider, text="还在冒烟")  # the same incident
        assert again["alert_id"] == first["alert_id"]
        assert (first["outcome"], first["points"]) == ("pending", 0)
        theirs = await s.report(other)  # someone else, the same incident
        blocked = await s.report(rider, category="blocked", station=OTHER)

        r = await s.http.post(f"/v1/reports/{first['report_id']}/confirm", headers=maint)
        assert r.status_code == 200, r.text
        assert (r.json()["outcome"], r.json()["points"]) == ("confirmed", SMOKE_POINTS)
        assert r.json()["decided_by"] == "li-wei"
        r = await s.http.post(f"/v1/reports/{again['report_id']}/confirm", headers=maint)
        assert r.status_code == 200, r.text
        dup = r.json()
        assert (dup["outcome"], dup["points"], dup["duplicate_of"]) == (
            "confirmed", 0, first["report_id"],
        )  # fmt: skip
        r = await s.http.post(f"/v1/reports/{theirs['report_id']}/confirm", headers=maint)
        assert r.json()["points"] == SMOKE_POINTS, "once per incident per rider, not in all"
        r = await s.http.post(
            f"/v1/reports/{blocked['report_id']}/reject", json={"note": "车停在别处"},
            headers=maint,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert (r.json()["outcome"], r.json()["points"]) == ("rejected", 0)
        # decisions are final
        for path, report in (("confirm", blocked), ("reject", first), ("confirm", first)):
            r = await s.http.post(f"/v1/reports/{report['report_id']}/{path}", headers=maint)
            assert r.status_code == 409, (path, r.text)
        r = await s.http.post("/v1/reports/999999/confirm", headers=maint)
        assert r.status_code == 404
        for headers in ({}, rider):  # maintainers only
            r = await s.http.post(f"/v1/reports/{blocked['report_id']}/confirm", headers=headers)
            assert r.status_code == 401, r.text

        me, reports = await s.mine(rider)
        assert me["points"] == SMOKE_POINTS
        assert [(e["delta"], e["reason"], e["by"], e["report_id"]) for e in me["ledger"]] == [
            (SMOKE_POINTS, "confirmed_by_maintainer", "maintainer", first["report_id"]),
        ]
        got = [(x["id"], x["outcome"], x["points"], x["rider_id"]) for x in reports]
        assert got == [
            (blocked["report_id"], "rejected", 0, None),
            (again["report_id"], "confirmed", 0, None),
            (first["report_id"], "confirmed", SMOKE_POINTS, None),
        ]
        assert reports[0]["decision_note"] == "车停在别处"
        assert reports[0]["decided_by"] == "maintainer", "riders do not see maintainers' names"

        # a maintainer takes the award back: a negative entry, once, in the audit log
        entry = me["ledger"][0]["id"]
        path = f"/v1/points/{entry}/reverse"
        r = await s.http.post(path, json={"reason": "同一辆车重复上报"}, headers=rider)
        assert r.status_code == 401
        r = await s.http.post(path, json={"reason": " \u200b "}, headers=maint)
        assert r.status_code == 422
        r = await s.http.post(path, json={"reason": "同一辆车重复上报"}, headers=maint)
        assert r.status_code == 201, r.text
        reversal = r.json()
        assert (reversal["delta"], reversal["reverses"], reversal["reason"]) == (
            -SMOKE_POINTS, entry, "reversed",
        )  # fmt: skip
        assert (await s.http.post(path, json={"reason": "again"}, headers=maint)).status_code == 409
        r = await s.http.post(
            f"/v1/points/{reversal['id']}/reverse", json={"reason": "undo"}, headers=maint
        )
        assert r.status_code == 409
        r = await s.http.post("/v1/points/999999/reverse", json={"reason": "x"}, headers=maint)
        assert r.status_code == 404
        me, reports = await s.mine(rider)
        assert me["points"] == 0
        assert [(e["delta"], e["note"], e["reversed_by"]) for e in me["ledger"]] == [
            (-SMOKE_POINTS, "同一辆车重复上报", None),
            (SMOKE_POINTS, None, reversal["id"]),
        ]
        assert reports[-1]["points"] == 0, "net of the reversal"

        # maintainers see riders' reports and ledgers with names; the public never does
        r = await s.http.get("/v1/reports", params={"rider": me["rider_id"]}, headers=maint)
        assert {x["rider_id"] for x in r.json()["reports"]} == {me["rider_id"]}
        assert len(r.json()["reports"]) == 3
        r = await s.http.get(f"/v1/riders/{me['rider_id']}", headers=maint)
        assert [e["by"] for e in r.json()["ledger"]] == ["li-wei", "li-wei"]
        for path in ("/v1/reports", f"/v1/riders/{me['rider_id']}"):
            assert (await s.http.get(path)).status_code == 401
            assert (await s.http.get(path, headers=rider)).status_code == 401
        r = await s.http.get("/v1/reports", params={"outcome": "lost"}, headers=maint)
        assert r.status_code == 422

        r = await s.http.get("/v1/audit", headers=admin)
        audit = [(e["action"], e["target"]) for e in r.json()["entries"]]
        assert audit == [
            ("points.reverse", str(entry)),
            ("report.reject", str(blocked["report_id"])),
            ("report.confirm", str(theirs["report_id"])),
            ("report.confirm", str(again["report_id"])),
            ("report.confirm", str(first["report_id"])),
        ]
        assert "同一辆车" not in r.text, "reasons stay in the ledger"


async def test_telemetry_confirms_and_what_nothing_confirms_expires(tmp_path: Path) -> None:
    async with sentinels(tmp_path) as s:
        rider, other = await s.register(), await s.register("老李")
        cabinet = Device(s.engine, s.clock, CABINET)
        cabinet.birth()
        cabinet.cabinet()
        smoke = await s.report(rider, device=CABINET, slot=3)
        anonymous = await s.report(None, device=CABINET)
        hazard_elsewhere = await s.report(rider, device=PILE, category="fire")
        broken = await s.report(rider, device=PILE, category="not_working")
        assert smoke["attached"] is False, "no alert of the rules yet: a rider_report opens"
        s.clock.advance(120)
        _, reports = await s.mine(rider)
        assert {r["outcome"] for r in reports} == {"pending"}

        cabinet.cabinet(smoke=True)  # the cabinet's own sensor, two minutes later
        fault = next(a for a in s.engine.by_id.values() if a.rule != "rider_report")
        assert (fault.code, fault.device_id) == ("smoke", CABINET)
        me, reports = await s.mine(rider)
        by_id = {r["id"]: r for r in reports}
        confirmed = by_id[smoke["report_id"]]
        assert (confirmed["outcome"], confirmed["decided_by"], confirmed["points"]) == (
            "confirmed", "telemetry", SMOKE_POINTS,
        )  # fmt: skip
        assert confirmed["confirmed_by_alert"] == fault.id
        assert me["points"] == SMOKE_POINTS
        assert [(e["reason"], e["alert_id"]) for e in me["ledger"]] == [
            ("confirmed_by_telemetry", smoke["alert_id"]),
        ]
        # another place's reports are not confirmed by it
        assert by_id[hazard_elsewhere["report_id"]]["outcome"] == "pending"
        assert by_id[broken["report_id"]]["outcome"] == "pending"

        # a report that joins the telemetry alert is confirmed at once; the same rider earns
        # nothing more for the incident, another rider does
        joined = await s.report(rider, device=CABINET)
        assert (joined["alert_id"], joined["outcome"], joined["points"]) == (
            fault.id, "confirmed", 0,
        )  # fmt: skip
        theirs = await s.report(other, device=CABINET)
        assert (theirs["outcome"], theirs["points"]) == ("confirmed", SMOKE_POINTS)

        # an anonymous report is confirmed too, and nobody earns for it
        r = await s.http.get("/v1/reports", headers=s.key())
        listed = {x["id"]: x for x in r.json()["reports"]}
        assert (listed[anonymous["report_id"]]["outcome"], listed[anonymous["report_id"]]["points"]) == ("confirmed", 0)  # fmt: skip

        # past the window, what nothing confirmed expires; a maintainer may still confirm it
        s.clock.advance(WINDOW_S)
        me, reports = await s.mine(rider)
        by_id = {r["id"]: r for r in reports}
        assert by_id[hazard_elsewhere["report_id"]]["outcome"] == "expired"
        assert by_id[broken["report_id"]]["outcome"] == "expired"
        assert me["points"] == SMOKE_POINTS
        r = await s.http.post(f"/v1/reports/{broken['report_id']}/confirm", headers=s.key())
        assert (r.json()["outcome"], r.json()["points"]) == ("confirmed", 3)

        # the cabinet's smoke alert is old news now: joining it confirms, and earns nothing
        s.clock.advance(1)
        late = await s.report(await s.register("晚到"), device=CABINET)
        assert (late["alert_id"], late["outcome"], late["points"]) == (fault.id, "confirmed", 0)
        r = await s.http.get("/v1/reports", headers=s.key())
        listed = {x["id"]: x for x in r.json()["reports"]}
        assert listed[late["report_id"]]["no_points"] == "known"
        assert listed[joined["report_id"]]["no_points"] == "duplicate"
        assert listed[theirs["report_id"]]["no_points"] is None


# -- settings ------------------------------------------------------------------------------


def test_point_rates_cover_every_category_and_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert set(PointRates.model_fields) == set(REPORT_CATEGORIES)
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__SENTINELS__POINTS__FIRE", "50")
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__SENTINELS__CONFIRM_WINDOW_S", "900")
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__REPORTS__RIDER_BURST", "5")
    alerts = ServeSettings().ingest.alerts
    assert (alerts.sentinels.points.fire, alerts.sentinels.points.smoke) == (50, 20)
    assert alerts.sentinels.confirm_window_s == 900
    assert (alerts.reports.rider_burst, alerts.reports.burst) == (5, 3)
    for name, bad in (("POINTS__FIRE", "1001"), ("POINTS__FIRE", "-1"), ("CONFIRM_WINDOW_S", "0")):
        monkeypatch.setenv(f"CHARGEWATCH_INGEST__ALERTS__SENTINELS__{name}", bad)
        with pytest.raises(ValueError, match=name.split("__")[-1].lower()):
            ServeSettings()
        monkeypatch.delenv(f"CHARGEWATCH_INGEST__ALERTS__SENTINELS__{name}")


async def test_a_rider_sees_their_points_while_the_alert_store_is_out(tmp_path: Path) -> None:
    async with sentinels(tmp_path) as s:
        rider = await s.register()
        first = await s.report(rider)
        r = await s.http.post(f"/v1/reports/{first['report_id']}/confirm", headers=s.key())
        assert r.json()["points"] == SMOKE_POINTS
        second = await s.report(rider, category="blocked", station=OTHER)
        s.engine.store.close()  # unreadable from now on (what a broken disk looks like)
        me, reports = await s.mine(rider)
        assert me["points"] == SMOKE_POINTS
        got = [(x["id"], x["outcome"]) for x in reports]
        assert got == [(second["report_id"], "pending"), (first["report_id"], "confirmed")]
