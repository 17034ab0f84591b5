"""Capped, jittered exponential backoff for reconnects (the "equal jitter" of AWS's note)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base_s: float = 0.5
    cap_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """Delay before the next attempt: min(cap, base * 2^n), the upper half jittered."""
        ceiling = min(self.cap_s, self.base_s * pow(2.0, self.attempt))
        self.attempt += 1
        return ceiling * self.rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0
