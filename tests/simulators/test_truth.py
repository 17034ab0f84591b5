"""The ground-truth log keeps every recorded line, in order, through close."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from simulators.truth import TruthLog
from tests.simulators.conftest import read_truth


async def test_every_line_reaches_the_file_in_order(tmp_path: Path) -> None:
    path = tmp_path / "truth.jsonl"
    async with TruthLog(path) as truth:
        for i in range(3000):
            truth.record(f"cw/v1/D{i % 7}/status", i % 2 == 0, json.dumps({"seq": i}))
            if i % 250 == 0:
                await asyncio.sleep(0.01)  # let the writer take batches while we record
        await truth.flush()
        truth.record_hold(devices=7)
        truth.record("cw/v1/D0/state", True, '{"v":1,"online":false,"boot":"b00t","seq":0}')
    lines = read_truth(path)
    assert [json.loads(line["payload"])["seq"] for line in lines[:3000]] == list(range(3000))
    assert lines[3000]["hold"] is True
    assert lines[3000]["devices"] == 7
    assert lines[3001]["topic"] == "cw/v1/D0/state"
    assert len(lines) == 3002
    assert truth.lines_written == 3002
    assert {line["qos"] for line in lines[:3000]} == {1}
    assert [line["retain"] for line in lines[:4]] == [True, False, True, False]
