"""Command options, nested in ``IngestConfig.commands`` (env ``CHARGEWATCH_INGEST__COMMANDS__*``)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator


class CommandsConfig(BaseModel):
    # A command nobody answered by then is `expired`: long enough for a device that is
    # reconnecting, short enough that "open the door" does not happen an hour late.
    ttl_default_s: float = Field(default=300.0, ge=5, le=86_400)
    # The shortest and longest a maintainer may ask for: below 5 s a round trip over a
    # mobile network may not make it; past a day nobody remembers asking.
    ttl_min_s: float = Field(default=5.0, ge=1, le=86_400)
    ttl_max_s: float = Field(default=86_400.0, ge=5, le=7 * 86_400)
    # An open command is published again this often (and at once when its device is born
    # again or our broker connection comes back): a device on a clean session misses what
    # is published while it is away. Devices answer a repeated id without acting again.
    resend_s: float = Field(default=30.0, ge=0.2, le=3600)
    # Open (pending/sent) commands per device: one stuck device cannot grow the store
    # without bound, and nobody needs more than this queued for one device.
    open_max_per_device: int = Field(default=50, ge=1, le=10_000)
    # Open commands in all: each is resent every resend_s, so this bounds that traffic
    # (10,000 every 30 s is ~330 publishes a second) and the store.
    open_max: int = Field(default=10_000, ge=1, le=1_000_000)
    # Commands kept in the store (newest); older ones are pruned as new ones come.
    kept: int = Field(default=100_000, ge=100)

    @model_validator(mode="after")
    def _ttl_order(self) -> CommandsConfig:
        if not self.ttl_min_s <= self.ttl_default_s <= self.ttl_max_s:
            raise ValueError("commands: need ttl_min_s <= ttl_default_s <= ttl_max_s")
        return self
