"""Text from people (rider reports, key names) kept as plain text: only what shows."""

from __future__ import annotations

import unicodedata

# Unicode categories dropped: controls (C0, DEL, C1), format characters (bidi embeddings,
# overrides and isolates, zero-width spaces and joiners, BOM, soft hyphen, tags...),
# surrogates, private use, unassigned; and line/paragraph separators.
_DROPPED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_BLANK = frozenset("\u115f\u1160\u3164\uffa0")  # Hangul fillers: letters that show nothing


def plain_text(text: str) -> str:
    """``text`` with only what shows: newlines kept, invisible and bidi characters out."""
    return "".join(
        c
        for c in text
        if c == "\n" or (c not in _BLANK and unicodedata.category(c) not in _DROPPED)
    ).strip()
