"""Per-kind alert thresholds keep their own defaults when only some options are set."""

from __future__ import annotations

import pytest

from api.settings import ServeSettings


def test_setting_one_pile_option_keeps_the_piles_other_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__PILE__CHARGING_NO_POWER_S", "300")
    alerts = ServeSettings().ingest.alerts
    assert alerts.pile.charging_no_power_s == 300
    assert (alerts.pile.temp_high_c, alerts.pile.temp_rise_c_per_min) == (75.0, 3.0)
    assert (alerts.cabinet.temp_high_c, alerts.cabinet.temp_rise_c_per_min) == (60.0, 2.0)
