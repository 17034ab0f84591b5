"""The HTTP surface: security headers on the pages and the API, /docs off unless asked for,
/metrics for loopback (or the configured networks) and keys, report text without bidi and
invisible characters. In-process through the whole ASGI app."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import ServeSettings
from api.text import plain_text
from tests.security.inprocess import STATION, bearer, in_process


async def test_pages_forbid_inline_script_and_framing(tmp_path: Path) -> None:
    async with in_process(tmp_path) as app:
        for path in ("/", "/console"):
            r = await app.http.get(path)
            assert r.status_code == 200
            csp = {
                d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split(";")
            }
            assert csp["frame-ancestors"] == ["'none'"]
            assert csp["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval'
            assert csp["style-src"] == ["'self'"]
            assert csp["object-src"] == ["'none'"]
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
            # the pages keep to it: no inline script, style or handler to be refused
            html = r.text.lower()
            assert "<script>" not in html
            assert "<style" not in html
            assert " style=" not in html
            assert " onclick=" not in html
            assert " onload=" not in html
        for path in ("/v1/stations", f"/v1/stations/{STATION}", "/static/app.js", "/healthz"):
            r = await app.http.get(path)
            assert r.status_code == 200, path
            assert r.headers["x-content-type-options"] == "nosniff", path
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path


async def test_docs_are_off_unless_asked_for(tmp_path: Path) -> None:
    async with in_process(tmp_path) as app:
        assert (await app.http.get("/docs")).status_code == 404
        assert (await app.http.get("/redoc")).status_code == 404
        r = await app.http.get("/openapi.json")
        assert r.status_code == 200
        assert "/v1/keys" in r.json()["paths"]
    async with in_process(tmp_path, settings=ServeSettings(docs=True)) as app:
        r = await app.http.get("/docs")
        assert r.status_code == 200
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("client", "headers", "settings", "allowed"),
    [
        ("127.0.0.1", {}, {}, True),
        ("::1", {}, {}, True),
        ("203.0.113.9", {}, {}, False),
        ("10.1.2.3", {}, {}, False),
        ("10.1.2.3", {}, {"metrics_allow": ["10.1.0.0/16"]}, True),
        # relayed by a proxy on loopback that the settings do not name: not local
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}, {}, False),
        ("127.0.0.1", {"Forwarded": "for=203.0.113.9"}, {}, False),
    ],
)
async def test_metrics_are_for_loopback_or_a_key(
    tmp_path: Path,
    client: str,
    headers: dict[str, str],
    settings: dict[str, list[str]],
    allowed: bool,
) -> None:
    async with in_process(
        tmp_path, settings=ServeSettings(**settings), client=(client, 40000)
    ) as app:
        r = await app.http.get("/metrics", headers=headers)
        assert r.status_code == (200 if allowed else 403), r.text
        if allowed:
            assert "chargewatch_" in r.text
        else:
            assert "CHARGEWATCH_METRICS_ALLOW" in r.json()["detail"]
            r = await app.http.get("/metrics", headers={**headers, **bearer(app.key())})
            assert r.status_code == 200
            r = await app.http.get("/metrics", headers={**headers, **bearer("cwk_x_y")})
            assert r.status_code == 401


def test_metrics_allow_is_validated() -> None:
    with pytest.raises(ValueError, match="not an address or network"):
        ServeSettings(metrics_allow=["everyone"])
    assert ServeSettings(metrics_allow="10.0.0.0/8, 192.168.1.5").metrics_allow == [  # type: ignore[arg-type]
        "10.0.0.0/8",
        "192.168.1.5",
    ]


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("smoke at slot 3", "smoke at slot 3"),
        ("冒烟了\n第3仓", "冒烟了\n第3仓"),
        # a right-to-left override reorders what a maintainer reads ("slot 3" -> "3 tols")
        ("pay \u202eexe.kcab\u202c now", "pay exe.kcab now"),
        ("a\u2066b\u2067c\u2068d\u2069e\u200ef\u200fg\u061ch", "abcdefgh"),
        # invisible: zero width, word joiner, BOM, soft hyphen, Mongolian vowel separator
        ("f\u200bi\u200cr\u200de\u2060!\ufeff\u00ad\u180e", "fire!"),
        ("tab\there\r\x00\x1b[31mred\x7f\x85\x9b", "tabhere[31mred"),
        ("line\u2028para\u2029end", "lineparaend"),
        ("\U000e0041\U000e0042tag", "tag"),  # tag characters hide ASCII
        ("\u3164\u115f\uffa0hidden", "hidden"),  # Hangul fillers
        ("\ue000private", "private"),
        ("  spaced  ", "spaced"),
    ],
)
def test_report_text_keeps_only_what_shows(text: str, kept: str) -> None:
    assert plain_text(text) == kept


async def test_a_report_with_bidi_controls_is_stored_without_them(tmp_path: Path) -> None:
    async with in_process(tmp_path, alerts=True) as app:
        r = await app.http.post(
            "/v1/reports",
            json={"station": STATION, "category": "other", "text": "door \u202e3 tols\u202c\u200b"},
        )
        assert r.status_code == 201, r.text
        r = await app.http.get(f"/v1/alerts/{r.json()['alert_id']}", headers=bearer(app.key()))
        texts = [n["text"] for n in r.json()["notes"]]
        assert any("door 3 tols" in t for t in texts), texts
        assert not any("\u202e" in t or "\u200b" in t for t in texts), texts
