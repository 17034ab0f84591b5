"""Serve settings that guard the HTTP side: trusted proxies and the body limit."""

from __future__ import annotations

import os
import subprocess

import pytest
from pydantic import ValidationError

from api.settings import ServeSettings
from tests.servers import chargewatch_argv


def test_no_proxy_is_trusted_by_default() -> None:
    assert ServeSettings().trusted_proxies == []
    assert ServeSettings().body_max_bytes == 64 * 1024


def test_trusted_proxies_from_a_comma_separated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARGEWATCH_TRUSTED_PROXIES", "10.0.0.5, 192.168.8.0/24,::1")
    assert ServeSettings().trusted_proxies == ["10.0.0.5", "192.168.8.0/24", "::1"]


@pytest.mark.parametrize("value", ["*", "proxy.example", "10.0.0.1/24"])
def test_anything_but_addresses_and_networks_is_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="not an address or network"):
        ServeSettings(trusted_proxies=[value])


def test_serve_says_what_to_fix() -> None:
    env = {**os.environ, "CHARGEWATCH_TRUSTED_PROXIES": "*"}
    out = subprocess.run(
        chargewatch_argv("serve"), env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "trusted_proxies" in out.stderr
    assert "'*' is not allowed" in out.stderr
    assert "Traceback" not in out.stderr
