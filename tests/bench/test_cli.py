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


def test_bench_is_a_regular_package_the_install_finds() -> None:
    # a namespace package (no __init__.py) imports from the source tree only, and
    # setuptools' find would leave it out of the installed distribution
    import importlib.util
    import tomllib
    from pathlib import Path

    spec = importlib.util.find_spec("bench")
    assert spec is not None
    assert spec.origin is not None
    assert spec.origin.endswith("bench/__init__.py")
    root = Path(spec.origin).parent.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "bench*" in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
