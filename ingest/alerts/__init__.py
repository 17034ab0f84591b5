"""Fault alerts: rules on twin changes and on a timer, one alert per condition with a
lifecycle (open -> acknowledged -> resolved), persisted next to the twins, streamed (SSE)
and sent to webhooks. See docs/alerts.md.

Modules: ``config`` (options and thresholds), ``rules`` (pure), ``model`` (alert, key,
view), ``store`` (SQLite), ``notify`` (webhooks), ``engine`` (lifecycle, composes the rest);
work orders: ``order_model``, ``order_store``, ``orders`` (follows the engine), and
``repair`` (time to acknowledge and to repair).
"""

from ingest.alerts.config import AlertsConfig
from ingest.alerts.engine import AlertEngine
from ingest.alerts.model import AlertConflict, AlertError, AlertNotFound

__all__ = ["AlertConflict", "AlertEngine", "AlertError", "AlertNotFound", "AlertsConfig"]
