"""``chargewatch bench`` reaches the benchmark runner, which lives outside the product."""

from __future__ import annotations

import pytest

from api.cli import main


def test_chargewatch_bench_dispatches_to_the_bench_package(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: chargewatch bench")
    assert "--short" in out
