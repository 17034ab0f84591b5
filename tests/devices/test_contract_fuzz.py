"""Mutated payloads: ``decode`` answers with a model or a ContractError, never anything else.

Seeded random mutations of the documented examples (bytes deleted, inserted or flipped,
values swapped for hostile tokens), so a run is repeatable. This found invalid UTF-8 inside
a JSON string escaping as UnicodeDecodeError.
"""

from __future__ import annotations

import random

import pytest

from devices.contract import REASONS, ContractError, decode
from tests.devices.test_contract import CABINET_STATUS, PILE_STATUS

SEEDS = [
    PILE_STATUS,
    CABINET_STATUS,
    b'{"v":1,"ts":"2026-11-28T12:00:00+08:00","boot":"7f3a","seq":0,"online":true,'
    b'"kind":"pile","model":"CW-P10","firmware":"1.4.2","ports":10,"heartbeat_s":30}',
    b'{"v":1,"online":false,"boot":"7f3a","seq":3}',
    b'{"v":1,"ts":1796284800000,"boot":"c0ff","seq":8,"type":"swap","slot_out":1,'
    b'"battery_out":"B-1","soc_out":97,"slot_in":2,"battery_in":"B-2","soc_in":10}',
]
TOKENS = [
    b"1e400", b"-1", b"0", b"true", b"null", b'"x"', b"[]", b"{}", b"NaN", b"9" * 30, b"1.5",
    b'"2026-13-40T99:00:00Z"', b"\xff", b"\xcb", b'"\\ud800"', b"[" * 3000, b'"\xa0"',
]  # fmt: skip


def mutate(rng: random.Random, payload: bytes) -> bytes:
    p = bytearray(payload)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(p)) if p else 0
        op = rng.random()
        if op < 0.3:
            del p[pos : pos + rng.randint(1, 5)]
        elif op < 0.6:
            p[pos:pos] = rng.choice(TOKENS)
        elif op < 0.8 and pos < len(p):
            p[pos] = rng.randrange(256)
        else:  # replace the value after the next colon
            colon = p.find(b":", pos)
            if colon > 0:
                end = colon + 1
                while end < len(p) and p[end] not in b",}]":
                    end += 1
                p[colon + 1 : end] = rng.choice(TOKENS)
    return bytes(p)


@pytest.mark.parametrize("seed", range(4))
def test_mutated_payloads_give_a_model_or_a_reason(seed: int) -> None:
    rng = random.Random(seed)
    reasons: set[str] = set()
    for _ in range(5_000):
        payload = mutate(rng, rng.choice(SEEDS))
        channel = rng.choice(["status", "state", "event"])
        try:
            decode(channel, payload)  # type: ignore[arg-type]
        except ContractError as exc:
            reasons.add(exc.reason)
    assert reasons <= set(REASONS)
    assert {"not_json", "schema"} <= reasons  # the mutations do reach both layers
