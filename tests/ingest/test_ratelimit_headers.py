"""Rate limiting and header cleaning (no servers)."""

from __future__ import annotations

from services.ingest.ratelimit import RateLimiter
from services.ingest.request import clean_header


def test_bucket_allows_burst_then_refuses_with_a_wait() -> None:
    limiter = RateLimiter()
    assert limiter.check("s", 10, 20, 20) == 0
    wait = limiter.check("s", 10, 20, 5)
    assert 0.4 < wait <= 0.5


def test_a_batch_larger_than_the_burst_passes_when_the_bucket_is_full() -> None:
    limiter = RateLimiter(share=0.25)  # 4 workers: each bucket holds a quarter
    assert limiter.check("s", 100, 200, 100) == 0  # 100 > 50 per worker, but the bucket was full
    assert limiter.check("s", 100, 200, 1) > 0  # and now it is in debt


def test_unlimited_source_is_never_limited() -> None:
    assert RateLimiter().check("s", None, None, 10_000) == 0


def test_non_utf8_header_bytes_become_replacement_characters() -> None:
    raw = b"Caf\xe9Browser".decode("utf-8", "surrogateescape")  # what aiohttp hands over
    cleaned = clean_header(raw)
    assert cleaned == "Caf\ufffdBrowser"
    cleaned.encode("utf-8")  # protobuf needs this to work
    assert clean_header("x" * 5000, 100) == "x" * 100
