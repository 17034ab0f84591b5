"""ETags of the rider answers: weak, and compared the weak way."""

from __future__ import annotations

from api.caching import _matches, etag_of, etag_of_bytes


def test_etags_are_weak_and_leave_ages_out() -> None:
    """Answers that differ only in their ages share an ETag, and so do the gzipped and the
    plain encoding of one answer: equivalent, not identical bytes, so the tag is weak."""
    tag = etag_of({"id": "S1", "free": 3, "data_age_s": 4})
    assert tag.startswith('W/"')
    assert tag.endswith('"')
    assert tag == etag_of({"id": "S1", "free": 3, "data_age_s": 40})
    assert tag != etag_of({"id": "S1", "free": 2, "data_age_s": 4})
    assert etag_of_bytes(b"x").startswith('W/"')


def test_if_none_match_uses_the_weak_comparison() -> None:
    tag = etag_of_bytes(b"answer")
    opaque = tag.removeprefix("W/")
    assert _matches(tag, tag)
    assert _matches(opaque, tag)  # a client or proxy that dropped the W/
    assert _matches(f'"other", {tag}', tag)
    assert _matches("*", tag)
    assert not _matches('"other"', tag)
    assert not _matches(None, tag)
