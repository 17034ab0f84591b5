from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Process, mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Process]:
    """A real mosquitto on a free loopback port, persistence on, stopped by PID afterwards."""
    with mosquitto(tmp_path / "mosquitto") as proc:
        yield proc
