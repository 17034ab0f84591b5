"""Riders' privacy: public answers carry no battery serials, charging session ids, boot ids
or firmware; a maintainer key gets every field, under ``Cache-Control: private``. In-process
through the whole ASGI app, twins fed directly (history: tests/e2e/test_privacy.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.security.inprocess import (
    BATTERY,
    BOOT,
    PILE_FIRMWARE,
    SESSION,
    STATION,
    bearer,
    feed_station,
    in_process,
)

SECRETS = (BATTERY, SESSION, BOOT, PILE_FIRMWARE)


def _devices(body: dict[str, object]) -> dict[str, dict[str, object]]:
    return {d["id"]: d for d in body["devices"]}  # type: ignore[attr-defined,index]


async def test_public_answers_hide_private_fields_and_keys_see_them(tmp_path: Path) -> None:
    async with in_process(tmp_path) as app:
        pile, cabinet = feed_station(app.ingest)
        maint = bearer(app.key("maintainer"))
        for accept in ("gzip", "identity"):
            enc = {"Accept-Encoding": accept}
            public = await app.http.get(f"/v1/stations/{STATION}", headers=enc)
            assert public.status_code == 200
            for secret in SECRETS:
                assert secret not in public.text, (accept, secret)
            assert public.headers["cache-control"].startswith("public")
            assert "authorization" in public.headers["vary"].lower()
            devices = _devices(public.json())
            # the same fields, the private ones null
            assert devices[pile]["firmware"] is None
            assert devices[pile]["boot"] is None
            assert devices[pile]["ports"][0]["session"] is None  # type: ignore[index]
            assert devices[pile]["ports"][0]["state"] == "charging"  # type: ignore[index]
            assert devices[cabinet]["slots"][0]["battery"] is None  # type: ignore[index]
            assert devices[cabinet]["slots"][0]["ready"] is True  # type: ignore[index]

            private = await app.http.get(f"/v1/stations/{STATION}", headers={**enc, **maint})
            assert private.status_code == 200
            assert private.headers["cache-control"].startswith("private")
            assert "authorization" in private.headers["vary"].lower()
            assert private.headers["etag"] != public.headers["etag"]
            devices = _devices(private.json())
            assert devices[pile]["firmware"] == PILE_FIRMWARE
            assert devices[pile]["boot"] == BOOT
            assert devices[pile]["ports"][0]["session"] == SESSION  # type: ignore[index]
            assert devices[cabinet]["slots"][0]["battery"] == BATTERY  # type: ignore[index]
            # every field a maintainer sees is there for the public too
            assert set(devices[pile]) == set(_devices(public.json())[pile])

            # a public ETag does not revalidate a private answer, nor the reverse
            r = await app.http.get(
                f"/v1/stations/{STATION}",
                headers={**enc, **maint, "If-None-Match": public.headers["etag"]},
            )
            assert r.status_code == 200
            assert BATTERY in r.text

        for device, secret in ((pile, SESSION), (cabinet, BATTERY)):
            public = await app.http.get(f"/v1/devices/{device}")
            assert public.status_code == 200
            for s in SECRETS:
                assert s not in public.text
            assert "authorization" in public.headers["vary"].lower()
            private = await app.http.get(f"/v1/devices/{device}", headers=maint)
            assert secret in private.text
            assert BOOT in private.text
            assert private.headers["cache-control"].startswith("private")
            assert set(json.loads(private.text)) == set(json.loads(public.text))

        # the station list and its stream never carried devices
        listing = await app.http.get("/v1/stations")
        for s in SECRETS:
            assert s not in listing.text


async def test_a_wrong_key_on_a_public_route_is_told_so(tmp_path: Path) -> None:
    async with in_process(tmp_path) as app:
        feed_station(app.ingest)
        for token in ("cwk_00000000_nope", "not-a-key"):
            r = await app.http.get(f"/v1/stations/{STATION}", headers=bearer(token))
            assert r.status_code == 401, r.text
            assert BATTERY not in r.text
