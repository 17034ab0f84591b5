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
    # Largest request body any route accepts (bytes), refused before it is read; routes for
    # small bodies (alert notes, ack, resolve) take less. Our bodies are a few KiB.
    body_max_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    ingest: IngestConfig = IngestConfig()
