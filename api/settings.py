"""Settings of the ``serve``/``demo`` process: env ``CHARGEWATCH_*`` (nested with ``__``),
overridden by command-line flags. Built at the entry point and passed down."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ingest.config import IngestConfig


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARGEWATCH_", env_nested_delimiter="__")

    # Loopback by default: expose deliberately (behind a reverse proxy with TLS).
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"
    ingest: IngestConfig = IngestConfig()
