"""Fixtures shared by the e2e modules: the headless chromium the page tests drive, and the
simulated district's run through mosquitto that two modules check (made once)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_district import DistrictRun, district_on_mosquitto
from tests.e2e.test_pages import CHROMIUM, CHROMIUM_ARGS, _missing


@pytest.fixture(scope="package")
def district_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistrictRun]:
    """The district (3 simulated hours, 412 devices) through a real mosquitto into a
    ``chargewatch serve`` that is stopped afterwards; tests restart a service on its data
    dir or work on a copy of it (test_district, test_history_truth)."""
    with district_on_mosquitto(tmp_path_factory.mktemp("district")) as run:
        yield run


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is not installed (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
