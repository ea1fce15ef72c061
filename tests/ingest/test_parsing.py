"""Request parsing rules, fast and property-based (no servers)."""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import segment
from services.ingest import parsing
from services.ingest.parsing import BoundedDecoder, RequestError, TrustedProxies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_json_parser(body: bytes) -> None:
    try:
        result = parsing.parse_json_body(body)
    except RequestError as exc:
        assert exc.status == 400 and exc.body["error"] == "invalid_json"
    else:
        assert isinstance(result, dict)


@given(json_values)
def test_validate_always_returns_a_list_of_messages(event: object) -> None:
    errors = segment.validate(event, "track")
    assert isinstance(errors, list) and all(isinstance(e, str) and e for e in errors)
    if not isinstance(event, dict):
        assert errors


@given(st.binary(max_size=5000), st.sampled_from(["gzip", "deflate", ""]), st.integers(1, 4096))
def test_decoder_only_answers_with_data_or_a_request_error(data: bytes, encoding: str, chunk: int) -> None:
    decoder = BoundedDecoder(encoding, limit=2000)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
        out = decoder.finish()
    except RequestError as exc:
        assert exc.status in (400, 413)
    else:
        assert len(out) <= 2000


@settings(max_examples=50)
@given(st.binary(min_size=0, max_size=6000), st.sampled_from(["gzip", "deflate"]), st.integers(1, 512))
def test_decoder_round_trips_within_the_limit(data: bytes, encoding: str, chunk: int) -> None:
    packed = gzip.compress(data) if encoding == "gzip" else zlib.compress(data)
    decoder = BoundedDecoder(encoding, limit=5000)
    try:
        for i in range(0, len(packed), chunk):
            decoder.feed(packed[i : i + chunk])
        out = decoder.finish()
    except RequestError as exc:
        assert exc.status == 413 and len(data) > 5000
    else:
        assert out == data


def test_bomb_stops_at_the_limit_not_the_full_size() -> None:
    bomb = gzip.compress(b"a" * (50 * 1024 * 1024))
    decoder = BoundedDecoder("gzip", limit=100_000)
    with pytest.raises(RequestError) as info:
        decoder.feed(bomb)
    assert info.value.status == 413
    assert decoder.size <= 100_001 + 100_000  # never more than about one limit inflated


@given(st.text(min_size=1, max_size=40).filter(lambda k: ":" not in k), st.booleans())
def test_basic_auth_write_key_with_and_without_colon(key: str, colon: bool) -> None:
    raw = (key + ":" if colon else key).encode()
    header = "Basic " + base64.b64encode(raw).decode()
    assert parsing.write_key_from_basic(header) == key


def test_write_key_sources_in_order() -> None:
    header = "Basic " + base64.b64encode(b"from-header:").decode()
    assert parsing.find_write_key(header, "from-query", {"writeKey": "from-body"}) == "from-header"
    assert parsing.find_write_key(None, "from-query", {"writeKey": "from-body"}) == "from-query"
    assert parsing.find_write_key(None, None, {"writeKey": "from-body"}) == "from-body"
    with pytest.raises(RequestError) as info:
        parsing.find_write_key(None, None, {"writeKey": 5})
    assert info.value.status == 401


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    proxies = TrustedProxies.parse(["10.0.0.0/8"])
    assert proxies.client_ip("10.1.2.3", "203.0.113.9, 10.9.9.9") == "203.0.113.9"
    assert proxies.client_ip("198.51.100.7", "203.0.113.9") == "198.51.100.7"
    assert proxies.client_ip("10.1.2.3", "1.1.1.1, 203.0.113.9") == "203.0.113.9"  # right-most untrusted
    assert TrustedProxies().client_ip("10.1.2.3", "203.0.113.9") == "10.1.2.3"
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        TrustedProxies.parse(["not-a-network"])


def test_stamp_adds_server_fields_and_keeps_client_times() -> None:
    event: dict[str, Any] = {
        "type": "track",
        "event": "E",
        "userId": "u",
        "writeKey": "secret",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "context": {"ip": "1.2.3.4"},
    }
    parsing.stamp(
        event,
        received_at="2026-11-24T00:00:00.000Z",
        client_ip="9.9.9.9",
        batch_context={"library": {"name": "x"}, "ip": "5.5.5.5"},
        batch_integrations={"All": False},
        batch_sent_at="2026-11-24T00:00:00Z",
    )
    assert "writeKey" not in event
    assert event["timestamp"] == "2026-01-01T00:00:00+00:00"
    assert event["context"] == {"library": {"name": "x"}, "ip": "1.2.3.4"}
    assert event["messageId"].startswith("hw-")
    assert event["sentAt"] == "2026-11-24T00:00:00Z"
    assert event["integrations"] == {"All": False}


@given(st.dictionaries(st.sampled_from(["event", "userId", "anonymousId", "name"]), st.text(max_size=10)))
def test_pixel_query_fields_become_an_event(query: dict[str, str]) -> None:
    event = parsing.decode_pixel(query, "track")
    assert event["type"] == "track"
    for key, value in query.items():
        assert event[key] == value


def test_pixel_data_accepts_standard_and_url_safe_base64() -> None:
    payload = json.dumps({"event": "Ã¿?>", "userId": "u"}).encode()
    for encoded in (base64.b64encode(payload), base64.urlsafe_b64encode(payload).rstrip(b"=")):
        assert parsing.decode_pixel({"data": encoded.decode()}, "track")["userId"] == "u"


def test_stamped_message_ids_are_unique_and_differ_in_a_forked_child() -> None:
    import os

    ids = {parsing.new_message_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(i.startswith("hw-") and len(i) <= segment.MESSAGE_ID_MAX for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes one id and leaves at once
        os.write(write, parsing.new_message_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read, 200).decode()
    os.close(read)
    os.close(write)
    assert child_id.startswith("hw-") and child_id.rsplit("-", 1)[0] != parsing.new_message_id().rsplit("-", 1)[0]


def test_iso_ms_matches_datetime_formatting_across_seconds() -> None:
    from datetime import UTC, datetime

    from services.ingest.parsing import iso_ms, iso_now_ms

    for ms in (0, 999, 1000, 1_795_535_689_541, 1_795_535_689_999, 1_795_535_690_000, 1_795_535_689_001):
        expected = iso_now_ms(datetime.fromtimestamp(ms / 1000, UTC).replace(microsecond=(ms % 1000) * 1000))
        assert iso_ms(ms) == expected, ms
