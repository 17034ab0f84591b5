"""Settings of the ``serve``/``demo`` process: env ``CHARGEWATCH_*`` (nested with ``__``),
overridden by command-line flags. Built at the entry point and passed down."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ingest.config import IngestConfig


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARGEWATCH_", env_nested_delimiter="__")

    # Loopback by default: expose deliberately (behind a reverse proxy with TLS).
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"
    # Largest request body any route accepts (bytes), refused before it is read; routes for
    # small bodies (alert notes, ack, resolve) take less. Our bodies are a few KiB.
    body_max_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Reverse proxies whose X-Forwarded-For/-Proto we believe (addresses or networks, comma
    # separated). None by default: a client could otherwise pick the address that rate
    # limits key on.
    trusted_proxies: Annotated[list[str], NoDecode] = []
    # Who may read /metrics without a key (addresses or networks, comma separated; a
    # maintainer key reads it from anywhere). Loopback by default: a Prometheus on the same
    # host works, and the counters (devices, alerts, errors) are not for the public.
    metrics_allow: Annotated[list[str], NoDecode] = ["127.0.0.0/8", "::1/128"]
    # /docs and /redoc load Swagger UI and ReDoc from a CDN: off for `serve` (a production
    # page should not run a third party's script), on for `demo`. /openapi.json is always
    # served (the API contract, to generate clients from).
    docs: bool = False
    ingest: IngestConfig = IngestConfig()

    @field_validator("trusted_proxies", "metrics_allow", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("trusted_proxies", "metrics_allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for proxy in value:
            try:
                ipaddress.ip_network(proxy)
            except ValueError:
                raise ValueError(
                    f"{proxy!r} is not an address or network (e.g. 10.0.0.5 or 10.0.0.0/24);"
                    " '*' is not allowed: anyone could then choose their own address"
                ) from None
        return value
