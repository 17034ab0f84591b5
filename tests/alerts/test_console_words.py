"""The console (api/static/i18n.js) names severities, fault codes, rules, events and statuses
with the same words as the notifications (ingest/alerts/messages.py), in both languages:
a maintainer reads one word for one thing, in the chat room and in the console."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ingest.alerts.messages import (
    EVENT_WORDS,
    FAULT_WORDS,
    LANGUAGES,
    ORDER_STATE_WORDS,
    REPORT_WORDS,
    RULE_WORDS,
    SEVERITY_WORDS,
    STATUS_WORDS,
)

I18N = Path(__file__).resolve().parents[2] / "api" / "static" / "i18n.js"


def texts() -> dict[str, dict[str, str]]:
    """TEXTS of i18n.js, per language (every ``key: "string"`` of its two blocks)."""
    source = I18N.read_text()
    zh_block = source.split("  zh: {", 1)[1].split("\n  en: {", 1)[0]
    en_block = source.split("\n  en: {", 1)[1].split("\n};", 1)[0]
    pair = re.compile(r'(\w+): ("(?:[^"\\]|\\.)*")')
    return {
        lang: {key: json.loads(value) for key, value in pair.findall(block)}
        for lang, block in (("zh", zh_block), ("en", en_block))
    }


@pytest.mark.parametrize("lang", LANGUAGES)
def test_console_words_are_the_notifications_words(lang: str) -> None:
    words = texts()[lang]
    assert len(words) > 100  # the parse found the blocks
    for prefix, table in (
        ("sev_", SEVERITY_WORDS),
        ("fault_", FAULT_WORDS),
        ("rule_", RULE_WORDS),
        ("event_", EVENT_WORDS),
        ("status_", STATUS_WORDS),
        ("order_", ORDER_STATE_WORDS),
    ):
        for key, word in table[lang].items():  # type: ignore[index]
            assert words.get(prefix + key) == word, f"{lang} {prefix}{key}"
    for category, word in REPORT_WORDS[lang].items():  # type: ignore[index]
        key = "cat" + "".join(part.capitalize() for part in category.split("_"))
        assert words.get(key) == word, f"{lang} {key}: the rider page's word"


def test_every_console_text_exists_in_both_languages() -> None:
    found = texts()
    assert set(found["zh"]) == set(found["en"])
    console_js = (I18N.parent / "console.js").read_text()
    console_html = (I18N.parent / "console.html").read_text()
    used = set(re.findall(r'\bt\("(c_\w+)"', console_js))
    used |= set(re.findall(r'data-i18n(?:-placeholder)?="(\w+)"', console_html))
    assert len(used) > 40
    for key in used:
        assert key in found["zh"], key
        assert key in found["en"], key
