"""Two notifiers with claims on one PostgreSQL outbox (two ingest workers, issue 13): while
the receiver is down, each keeps renewing the claims of the notifications it raised, so the
other never takes them over; once it is back, every notification is delivered exactly once,
under ids of the database's sequence. Serve's notifier (no claims) is unchanged."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import pytest

from ingest.alerts.config import WebhookOptions
from ingest.alerts.ids import IdPool
from ingest.alerts.notify import Notifier, Subscription
from ingest.alerts.store import AlertStore
from tests.alerts.receiver import receiver
from tests.alerts.test_formats import make_alert
from tests.servers import eventually

pytestmark = pytest.mark.e2e

FAST: dict[str, Any] = {"backoff_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 2}
LEASE_S = 1.0


def claiming(store: AlertStore) -> Notifier:
    return Notifier(
        store,
        WebhookOptions(**FAST),
        claim_lease_s=LEASE_S,
        ids=IdPool(lambda n: store.reserve_ids("delivery", n), block=4),
    )


async def test_claims_renewed_while_retrying_each_sent_once(pg_url: str) -> None:
    a, b = AlertStore.on_postgresql(pg_url), AlertStore.on_postgresql(pg_url)
    try:
        with receiver() as hook:
            a.add_webhook(Subscription(id=0, url=hook.url, secret="s", created_at_ms=1).record())
            hook.down_for(4 * LEASE_S)  # retried past several leases
            async with claiming(a) as first, claiming(b) as second:
                for i in range(1, 4):
                    first.publish("opened", make_alert(id=i))
                    second.publish("opened", make_alert(id=10 + i))

                def six() -> None:
                    assert len(hook.delivered()) >= 6

                await asyncio.to_thread(eventually, six, timeout=30)
                await asyncio.sleep(2 * LEASE_S)  # nothing more comes
                assert first.lost_claims == second.lost_claims == 0
                assert first.taken_over == second.taken_over == 0
        sent = collections.Counter(alert_id for _, alert_id in hook.events())
        assert sent == dict.fromkeys([1, 2, 3, 11, 12, 13], 1)
        ids = [r.headers["x-chargewatch-delivery"] for r in hook.delivered()]
        assert len(set(ids)) == 6
        assert {r["status"] for r in a.deliveries()} == {"delivered"}
    finally:
        a.close()
        b.close()


def test_claims_need_database_ids(tmp_path: Path) -> None:
    store = AlertStore.in_dir(tmp_path)
    try:
        with pytest.raises(ValueError, match="need delivery ids"):
            Notifier(store, WebhookOptions(), claim_lease_s=5)
    finally:
        store.close()
