"""``chargewatch ingest``'s settings from the environment: the broker's URL (with its password)
can stay out of the process list, as the database's and the history's can."""

from __future__ import annotations

import argparse

import pytest

from ingest import IngestError
from ingest.worker import _ingest_args, add_parser

DB = "postgresql://cw@127.0.0.1/cw"


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["ingest", *argv])


def test_the_broker_from_chargewatch_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARGEWATCH_BROKER", "mqtt://ingest:s3cret@127.0.0.1:1884")
    monkeypatch.setenv("CHARGEWATCH_DB", DB)
    a = _ingest_args(parsed())
    assert (a.broker.host, a.broker.port, a.broker.username) == ("127.0.0.1", 1884, "ingest")
    assert a.db == DB
    # the command line wins over the environment
    assert _ingest_args(parsed("--broker", "mqtt://127.0.0.1:1885")).broker.port == 1885


def test_no_broker_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHARGEWATCH_BROKER", raising=False)
    with pytest.raises(IngestError, match=r"--broker mqtt://… \(or CHARGEWATCH_BROKER\)"):
        _ingest_args(parsed("--db", DB))


def test_the_history_from_chargewatch_history(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARGEWATCH_BROKER", "mqtt://127.0.0.1:1884")
    monkeypatch.setenv("CHARGEWATCH_DB", DB)
    monkeypatch.delenv("CHARGEWATCH_HISTORY", raising=False)
    assert _ingest_args(parsed()).history is None  # PostgreSQL's day partitions
    url = "influx2://127.0.0.1:8086?org=o&bucket=b&token=s3cret"
    monkeypatch.setenv("CHARGEWATCH_HISTORY", url)
    assert _ingest_args(parsed()).history == url
    # the command line wins over the environment
    other = "influx1://127.0.0.1:8086?db=cw"
    assert _ingest_args(parsed("--history", other)).history == other
