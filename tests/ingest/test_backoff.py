"""The shared reconnect backoff (ingest.backoff): doubling from the first wait, capped, with
jitter, and still capped after any number of failures in a row (a day-long outage of the
database made ``0.25 * 2**failures`` overflow a float and end the loop that retried)."""

from __future__ import annotations

import pytest

from ingest.backoff import backoff_s


@pytest.mark.parametrize(
    ("failures", "full_s"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (6, 5.0), (1100, 5.0), (10**9, 5.0)],
)
def test_the_wait_doubles_from_the_first_and_stops_at_the_cap(failures: int, full_s: float) -> None:
    waits = [backoff_s(failures, first_s=0.5, cap_s=5.0) for _ in range(200)]
    assert all(full_s / 2 <= w <= full_s for w in waits), (min(waits), max(waits))
    assert max(waits) - min(waits) > full_s / 10  # jittered: many workers do not retry in step


def test_a_low_cap_wins_and_a_first_wait_is_needed() -> None:
    assert 0.25 <= backoff_s(0, first_s=0.5, cap_s=5.0) <= 0.5
    assert all(0.05 <= backoff_s(n, first_s=0.5, cap_s=0.1) <= 0.1 for n in (1, 2, 10**6))
    with pytest.raises(ValueError, match="first wait"):
        backoff_s(1, first_s=0, cap_s=5.0)
