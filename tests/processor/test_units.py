"""Fast tests of the processor's pure parts: no Kafka, no Cassandra."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.common.badrow import BadRow, FailureType
from services.common.proto.envelope_pb2 import Envelope
from services.common.sources import Destination, Enrichment, SourceRegistry, parse_sources
from services.processor import normalise as norm
from services.processor.dedupe import DedupeWindow, decode_entries, dedupe_key, encode_entries
from services.processor.enrich import Enricher, _split, anonymise_ip, is_bot, referrer_medium
from services.processor.pipeline import Kind, Pipeline
from services.processor.routing import destinations
from services.processor.settings import Settings
from tests.processor.conftest import (
    BERLIN_IP6,
    CHROME_UA,
    GOOGLEBOT_UA,
    IPHONE_UA,
    LONDON_IP,
    envelope,
    record,
)

RECEIVED = datetime(2026, 11, 24, 15, 0, 0, 123000, tzinfo=UTC)
RECEIVED_MS = int(RECEIVED.timestamp() * 1000)


# -- timestamps ------------------------------------------------------------------


def times(event: dict[str, Any], skew_s: float = 600) -> tuple[dict[str, str], list[str]]:
    flags: list[str] = []
    return norm.event_time(event, RECEIVED, timedelta(seconds=skew_s), flags), flags


def test_format_is_utc_millis_z() -> None:
    moment = datetime(2026, 11, 24, 16, 0, 0, 5999, tzinfo=UTC).astimezone()
    assert norm.format_ts(moment) == "2026-11-24T16:00:00.005Z"


@given(st.datetimes(timezones=st.timezones()))
def test_format_matches_isoformat(moment: datetime) -> None:
    # format_ts builds the string from a cached seconds part; isoformat is the reference.
    try:
        reference = moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    except OverflowError:  # out of range once converted to UTC
        return
    assert norm.format_ts(moment) == reference


@given(
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.timezones()),
    st.sampled_from(["milliseconds", "microseconds", "seconds", "auto"]),
    st.booleans(),
)
def test_sent_times_come_out_as_format_ts_writes_them(moment: datetime, timespec: str, zulu: bool) -> None:
    # Strings already in the output shape are passed through without formatting;
    # the result must be the same as formatting whatever was sent.
    text = moment.isoformat(timespec=timespec)
    if zulu and moment.utcoffset() == timedelta(0):
        text = moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
    out, _ = times({"timestamp": text, "originalTimestamp": text, "sentAt": text}, skew_s=10**12)
    expected = norm.format_ts(norm.parse_ts(text, "timestamp"))
    assert out["timestamp"] == out["originalTimestamp"] == out["sentAt"] == expected


def test_segment_skew_rule_when_timestamp_absent() -> None:
    # Device clock 1 hour behind: sent at 14:00:05 device time, event at 14:00:00 device time.
    out, flags = times({"originalTimestamp": "2026-11-24T14:00:00.000Z", "sentAt": "2026-11-24T14:00:05Z"})
    assert out["timestamp"] == "2026-11-24T14:59:55.123Z"
    assert out["originalTimestamp"] == "2026-11-24T14:00:00.000Z"
    assert out["sentAt"] == "2026-11-24T14:00:05.000Z"
    assert out["receivedAt"] == "2026-11-24T15:00:00.123Z"
    assert flags == []


# Device clock one hour behind: the event at 14:00:00.000 and the send at 14:00:05.000 device
# time, received at 15:00:00.123: corrected, the event happened 5 s before receipt.
SLOW_DEVICE = {"timestamp": "2026-11-24T14:00:00.000Z", "sentAt": "2026-11-24T14:00:05.000Z"}
CORRECTED = "2026-11-24T14:59:55.123Z"


def library(name: str, **fields: Any) -> dict[str, Any]:
    return {**fields, "context": {"library": {"name": name, "version": "1.0"}}}


def skewed(event: dict[str, Any], clock_skew: norm.ClockSkew) -> tuple[dict[str, str], list[str]]:
    flags: list[str] = []
    return norm.event_time(event, RECEIVED, timedelta(seconds=600), flags, clock_skew), flags


@pytest.mark.parametrize("name", sorted(norm.CLIENT_LIBRARIES))
def test_client_library_timestamp_is_corrected_under_auto(name: str) -> None:
    out, flags = skewed(library(name, **SLOW_DEVICE), "auto")
    assert out["timestamp"] == CORRECTED
    # Segment's shape: the device's own time is kept as originalTimestamp.
    assert out["originalTimestamp"] == "2026-11-24T14:00:00.000Z"
    assert out["sentAt"] == "2026-11-24T14:00:05.000Z"
    assert flags == []


@pytest.mark.parametrize("name", ["analytics-python", "analytics-node", "analytics.js-fork", ""])
def test_server_library_timestamp_stands_under_auto(name: str) -> None:
    out, _ = skewed(library(name, **SLOW_DEVICE), "auto")
    assert out["timestamp"] == "2026-11-24T14:00:00.000Z"
    assert "originalTimestamp" not in out


def test_no_library_at_all_keeps_the_timestamp_under_auto() -> None:
    out, _ = skewed(dict(SLOW_DEVICE), "auto")
    assert out["timestamp"] == "2026-11-24T14:00:00.000Z"
    out, _ = skewed({**SLOW_DEVICE, "context": {"library": "analytics.js"}}, "auto")  # not an object
    assert out["timestamp"] == "2026-11-24T14:00:00.000Z"


def test_correct_corrects_every_library() -> None:
    out, _ = skewed(library("analytics-python", **SLOW_DEVICE), "correct")
    assert out["timestamp"] == CORRECTED
    assert out["originalTimestamp"] == "2026-11-24T14:00:00.000Z"


def test_trust_never_corrects() -> None:
    out, _ = skewed(library("analytics-ios", **SLOW_DEVICE), "trust")
    assert out["timestamp"] == "2026-11-24T14:00:00.000Z" and "originalTimestamp" not in out
    # Without a timestamp, originalTimestamp is taken as is too.
    out, _ = skewed({"originalTimestamp": "2026-11-24T14:00:00.000Z", "sentAt": "2026-11-24T14:00:05Z"}, "trust")
    assert out["timestamp"] == "2026-11-24T14:00:00.000Z"


def test_client_library_without_sent_at_keeps_its_time() -> None:
    out, _ = skewed(library("analytics-android", timestamp="2026-11-24T14:00:00.000Z"), "auto")
    assert out["timestamp"] == "2026-11-24T14:00:00.000Z"
    assert out["originalTimestamp"] == "2026-11-24T14:00:00.000Z"


def test_device_clock_ahead_is_corrected_not_clamped() -> None:
    # Two hours fast, offline queue: event at 17:00:00 device time, sent 30 minutes later.
    event = library("analytics-swift", timestamp="2026-11-24T19:00:00+02:00", sentAt="2026-11-24T17:30:00Z")
    out, flags = skewed(event, "auto")
    assert out["timestamp"] == "2026-11-24T14:30:00.123Z"
    assert flags == []
    # Trusted, the same event is two hours in the future: clamped to receipt and flagged.
    out, flags = skewed(event, "trust")
    assert out["timestamp"] == "2026-11-24T15:00:00.123Z" and flags == [norm.FLAG_TIMESTAMP_CLAMPED]


def test_pipeline_takes_clock_skew_from_the_source(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    path.write_bytes(
        orjson.dumps(
            {
                "sources": [
                    {"id": "app", "name": "app", "write_key": "wk-app"},
                    {"id": "kiosk", "name": "kiosk", "write_key": "wk-kiosk", "clock_skew": "trust"},
                    {"id": "backend", "name": "backend", "write_key": "wk-backend", "clock_skew": "correct"},
                ]
            }
        )
    )
    registry = SourceRegistry(path)
    assert registry.load()
    pipe = Pipeline(Settings(sources_file=path), registry, Enricher(geoip_path=None, ua_cache_size=1, geo_cache_size=1))
    expected = {
        ("app", "analytics.js"): CORRECTED,
        ("kiosk", "analytics.js"): "2026-11-24T14:00:00.000Z",
        ("backend", "analytics-node"): CORRECTED,
        ("app", "analytics-node"): "2026-11-24T14:00:00.000Z",
        ("gone", "analytics.js"): CORRECTED,
    }  # an unknown source gets the default, auto
    for (source_id, name), timestamp in expected.items():
        event = library(name, type="identify", userId="u", **SLOW_DEVICE)
        result = pipe.process(record(envelope(event, source_id=source_id, received_at_ms=RECEIVED_MS)), never)
        assert orjson.loads(result.outputs[0].value)["timestamp"] == timestamp, (source_id, name)


def test_clock_skew_setting_is_validated() -> None:
    with pytest.raises(ValidationError, match="clock_skew"):
        parse_sources(
            orjson.dumps({"sources": [{"id": "a", "name": "a", "write_key": "k", "clock_skew": "sometimes"}]})
        )


def test_given_timestamp_stands_and_offsets_are_converted() -> None:
    out, _ = times({"timestamp": "2026-11-24T10:00:00+02:00", "sentAt": "2026-11-24T08:00:05+00:00"})
    assert out["timestamp"] == "2026-11-24T08:00:00.000Z"
    assert "originalTimestamp" not in out


def test_no_times_at_all_uses_received() -> None:
    out, _ = times({})
    assert out["timestamp"] == out["receivedAt"] == "2026-11-24T15:00:00.123Z"


def test_naive_timestamp_is_utc() -> None:
    out, _ = times({"timestamp": "2026-11-24T12:00:00.5"})
    assert out["timestamp"] == "2026-11-24T12:00:00.500Z"


def test_future_timestamp_is_clamped_and_flagged() -> None:
    out, flags = times({"timestamp": "2026-11-25T15:00:00Z"}, skew_s=600)
    assert out["timestamp"] == out["receivedAt"]
    assert flags == [norm.FLAG_TIMESTAMP_CLAMPED]
    out, flags = times({"timestamp": "2026-11-24T15:05:00Z"}, skew_s=600)
    assert out["timestamp"] == "2026-11-24T15:05:00.000Z" and flags == []


def test_bad_timestamp_raises() -> None:
    with pytest.raises(norm.TimestampError, match="sentAt"):
        times({"sentAt": "yesterday"})


def test_normalise_shape() -> None:
    event = {
        "type": "t",
        "event": "Signed Up",
        "userId": 42,
        "anonymousId": None,
        "writeKey": "secret",
        "properties": {"a": 1},
        "context": {"library": {"name": "x"}},
    }
    out = norm.normalise(event, message_id="m1", received=RECEIVED, max_future_skew=timedelta(minutes=10), flags=[])
    assert out["type"] == "track"
    assert out["userId"] == "42"
    assert "anonymousId" not in out and "writeKey" not in out
    assert out["messageId"] == "m1" and out["properties"] == {"a": 1}
    assert out["context"] == {"library": {"name": "x"}}


# -- enrichment -------------------------------------------------------------------


@pytest.fixture(scope="module")
def enricher_no_geo() -> Enricher:
    return Enricher(geoip_path=None, ua_cache_size=100, geo_cache_size=100)


def enrich(
    enricher: Enricher,
    event: dict[str, Any],
    switches: Enrichment | None = None,
    ua: str = CHROME_UA,
    ip: str = LONDON_IP,
) -> tuple[dict[str, Any], list[str]]:
    event.setdefault("context", {})
    flags: list[str] = []
    enricher.enrich(event, switches=switches or Enrichment(), header_ua=ua, client_ip=ip, flags=flags)
    return event, flags


def test_user_agent_fields(enricher_no_geo: Enricher) -> None:
    event, _ = enrich(enricher_no_geo, {}, ua=IPHONE_UA)
    parsed = event["context"]["userAgentParsed"]
    assert parsed["browser"] == {"family": "Mobile Safari", "version": "17.0"}
    assert parsed["os"] == {"family": "iOS", "version": "17.0"}
    assert parsed["device"] == {"family": "iPhone", "brand": "Apple", "model": "iPhone"}
    assert event["context"]["bot"] is False


def test_context_user_agent_beats_header(enricher_no_geo: Enricher) -> None:
    event, _ = enrich(enricher_no_geo, {"context": {"userAgent": IPHONE_UA}}, ua="analytics-python/2.4")
    assert event["context"]["userAgentParsed"]["os"]["family"] == "iOS"


@pytest.mark.parametrize(
    ("ua", "bot"),
    [
        (GOOGLEBOT_UA, True),
        ("curl/8.5.0", True),
        ("python-requests/2.31", True),
        ("Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/120.0.0.0 Safari/537.36", True),
        (CHROME_UA, False),
        (IPHONE_UA, False),
    ],
)
def test_bot_flag(ua: str, bot: bool) -> None:
    assert is_bot(ua) is bot


def test_switches_off(enricher_no_geo: Enricher) -> None:
    switches = Enrichment(user_agent=False, bot=False, campaign=False, geo=False)
    event, _ = enrich(enricher_no_geo, {"context": {"page": {"url": "https://a.example/?utm_source=x"}}}, switches)
    assert set(event["context"]) == {"page", "ip"}


def test_geo_then_anonymise(geoip_db: Path) -> None:
    enricher = Enricher(geoip_path=geoip_db, ua_cache_size=10, geo_cache_size=10)
    try:
        event, _ = enrich(enricher, {}, Enrichment(ip="anonymize"), ip=LONDON_IP)
        assert event["context"]["geo"] == {
            "country": "GB",
            "region": "ENG",
            "city": "London",
            "latitude": 51.5142,
            "longitude": -0.0931,
            "timeZone": "Europe/London",
        }
        assert event["context"]["ip"] == "81.2.69.0"
        event, _ = enrich(enricher, {"context": {"ip": BERLIN_IP6}}, Enrichment(ip="remove"))
        assert event["context"]["geo"]["city"] == "Berlin"
        assert "ip" not in event["context"]
        event, _ = enrich(enricher, {}, Enrichment(), ip="10.1.2.3")
        assert "geo" not in event["context"] and event["context"]["ip"] == "10.1.2.3"
    finally:
        enricher.close()


@pytest.mark.parametrize(
    ("ip", "masked"),
    [
        ("81.2.69.142", "81.2.69.0"),
        ("2a02:8108:1234:5678::1", "2a02:8108:1234::"),
        ("::ffff:81.2.69.142", "81.2.69.0"),
        ("not-an-ip", None),
        (" 10.0.0.255 ", "10.0.0.0"),
    ],
)
def test_anonymise_ip(ip: str, masked: str | None) -> None:
    assert anonymise_ip(ip) == masked


def test_invalid_ip_is_removed_and_flagged(enricher_no_geo: Enricher) -> None:
    event, flags = enrich(enricher_no_geo, {"context": {"ip": "bogus"}}, Enrichment(ip="anonymize"))
    assert "ip" not in event["context"] and flags == ["ip_invalid"]


def test_campaign_click_ids_referrer(enricher_no_geo: Enricher) -> None:
    url = (
        "https://shop.example.com/landing?utm_source=news&utm_medium=email&utm_campaign=black-friday"
        "&utm_term=shoes&utm_content=hero&gclid=G1&fbclid=F1&msclkid=M1&other=1"
    )
    event, _ = enrich(
        enricher_no_geo, {"context": {"page": {"url": url, "referrer": "https://www.google.com/search?q=shoes"}}}
    )
    ctx = event["context"]
    assert ctx["campaign"] == {
        "source": "news",
        "medium": "email",
        "name": "black-friday",
        "term": "shoes",
        "content": "hero",
    }
    assert ctx["clickIds"] == {"gclid": "G1", "fbclid": "F1", "msclkid": "M1"}
    assert ctx["referrer"] == {
        "url": "https://www.google.com/search?q=shoes",
        "host": "www.google.com",
        "medium": "search",
    }


def test_client_campaign_wins(enricher_no_geo: Enricher) -> None:
    event, _ = enrich(
        enricher_no_geo,
        {
            "context": {
                "campaign": {"name": "given"},
                "page": {"url": "https://a.example/?utm_campaign=url&utm_source=s"},
            }
        },
    )
    assert event["context"]["campaign"] == {"name": "given", "source": "s"}
    assert "clickIds" not in event["context"]


@pytest.mark.parametrize(
    ("host", "page", "medium"),
    [
        ("www.google.co.uk", None, "search"),
        ("t.co", None, "social"),
        ("m.facebook.com", None, "social"),
        ("mail.google.com", None, "email"),
        ("blog.example.org", None, "referral"),
        ("shop.example.com", "shop.example.com", "internal"),
    ],
)
def test_referrer_medium(host: str, page: str | None, medium: str) -> None:
    assert referrer_medium(host, page) == medium


# -- routing ----------------------------------------------------------------------


def test_routing_rules() -> None:
    rules = (
        Destination(name="all"),
        Destination(name="crm", types=("identify", "group")),
        Destination(name="billing", types=("track",), events=("Order Completed",)),
        Destination(name="pro", where={"properties.plan": "pro", "context.locale": "en"}),
        Destination(name="pages", events=("Home",)),
    )
    assert destinations(rules, {"type": "identify"}) == ["all", "crm"]
    assert destinations(rules, {"type": "track", "event": "Order Completed"}) == ["all", "billing"]
    assert destinations(rules, {"type": "track", "event": "Viewed"}) == ["all"]
    assert destinations(
        rules, {"type": "track", "event": "x", "properties": {"plan": "pro"}, "context": {"locale": "en"}}
    ) == ["all", "pro"]
    assert destinations(rules, {"type": "track", "event": "x", "properties": {"plan": "pro"}}) == ["all"]
    assert destinations(rules, {"type": "page", "name": "Home"}) == ["all", "pages"]


# -- dedupe window ----------------------------------------------------------------


def test_dedupe_window_bounds_and_expiry() -> None:
    window = DedupeWindow(window_ms=1000, max_entries=3)
    for i in range(5):
        window.add(f"k{i}", 100 + i)
    assert len(window) == 3 and window.evicted == 2
    assert not window.is_duplicate("k0", 200)  # evicted: the oldest went first
    assert window.is_duplicate("k4", 900)
    assert not window.is_duplicate("k4", 104 + 1000)  # outside the window
    window.expire(1104)
    assert len(window) == 1  # k2 (102), k3 (103) expired
    assert decode_entries(encode_entries({dedupe_key("s", "m"): 7, "k": 8})) == [("s\x1fm", 7), ("k", 8)]
    assert decode_entries(None) == [] and decode_entries(b"x") == [] and decode_entries(b"[1]") == []


# -- the whole pipeline on one record --------------------------------------------


@pytest.fixture
def pipeline(sources_file: Path, geoip_db: Path) -> Pipeline:
    settings = Settings(sources_file=sources_file, geoip_path=geoip_db)
    registry = SourceRegistry(sources_file)
    assert registry.load()
    return Pipeline(settings, registry, Enricher(geoip_path=geoip_db, ua_cache_size=10, geo_cache_size=10))


def never(_key: str, _ts: int) -> bool:
    return False


def test_pipeline_enriched(pipeline: Pipeline) -> None:
    raw = envelope(
        {
            "type": "track",
            "event": "Order Completed",
            "userId": "u1",
            "properties": {"plan": "pro"},
            "timestamp": "2026-11-24T14:59:00Z",
            "context": {"ip": LONDON_IP},
        },
        message_id="m-1",
        received_at_ms=RECEIVED_MS,
    )
    result = pipeline.process(record(raw), never)
    assert result.kind is Kind.ENRICHED
    topics = [o.topic for o in result.outputs]
    assert topics == ["events.enriched", "dest.warehouse", "dest.billing", "dest.pro"]
    out = orjson.loads(result.outputs[0].value)
    assert out["messageId"] == "m-1" and out["timestamp"] == "2026-11-24T14:59:00.000Z"
    assert out["receivedAt"] == "2026-11-24T15:00:00.123Z"
    assert out["context"]["ip"] == "81.2.69.0" and out["context"]["geo"]["city"] == "London"
    assert out["_hw"]["source_id"] == "web" and out["_hw"]["flags"] == []
    assert result.seen == (dedupe_key("web", "m-1"), RECEIVED_MS)
    assert result.outputs[0].key == b"web:u1"


def test_pipeline_duplicate(pipeline: Pipeline) -> None:
    raw = envelope({"type": "identify", "userId": "u1"}, message_id="m-2")
    result = pipeline.process(record(raw), lambda key, _ts: key == dedupe_key("web", "m-2"))
    assert result.kind is Kind.DUPLICATE and result.outputs == []


def test_pipeline_unknown_source_is_kept_and_flagged(pipeline: Pipeline) -> None:
    result = pipeline.process(record(envelope({"type": "identify", "userId": "u"}, source_id="gone")), never)
    assert result.kind is Kind.ENRICHED and [o.topic for o in result.outputs] == ["events.enriched"]
    assert orjson.loads(result.outputs[0].value)["_hw"]["flags"] == ["unknown_source"]


def test_pipeline_type_from_path(pipeline: Pipeline) -> None:
    result = pipeline.process(record(envelope({"event": "Clicked", "userId": "u"}, path="/v1/t")), never)
    assert orjson.loads(result.outputs[0].value)["type"] == "track"


BAD_INPUTS = [
    (None, FailureType.ENVELOPE_DECODE),
    (b"\xff\xff\xff\xff", FailureType.ENVELOPE_DECODE),
    (envelope({"type": "identify", "userId": "u"}, source_id=""), FailureType.ENVELOPE_DECODE),
    (envelope(b"{not json"), FailureType.INVALID_JSON),
    (envelope(b"[1, 2]"), FailureType.INVALID_JSON),
    (envelope({"type": "track", "userId": "u"}), FailureType.SCHEMA_VIOLATION),
    (envelope({"type": "identify"}), FailureType.SCHEMA_VIOLATION),
    (envelope({"type": "nope", "userId": "u"}), FailureType.SCHEMA_VIOLATION),
    (envelope({"type": "identify", "userId": "u", "timestamp": "soon"}), FailureType.SCHEMA_VIOLATION),
    (envelope({"type": "identify", "userId": "u", "traits": {"x": "y" * 2000}}), FailureType.SIZE_VIOLATION),
]


@pytest.mark.parametrize(("value", "failure"), BAD_INPUTS)
def test_pipeline_bad_rows(sources_file: Path, value: bytes | None, failure: FailureType) -> None:
    settings = Settings(sources_file=sources_file, max_event_bytes=1024)
    registry = SourceRegistry(sources_file)
    registry.load()
    pipe = Pipeline(settings, registry, Enricher(geoip_path=None, ua_cache_size=1, geo_cache_size=1))
    rec = record(value)
    result = pipe.process(rec, never)
    assert result.kind is Kind.DLQ and result.reason is failure
    [out] = result.outputs
    assert out.topic == "events.dlq"
    row = BadRow.decode(out.value)
    assert row["failure_type"] == failure.value and row["errors"]
    assert row["input"] == {
        "topic": "events.raw",
        "partition": 0,
        "offset": rec.offset,
        "request_id": row["input"]["request_id"],
    }
    assert row["producer"]["service"] == "processor"
    if row["extra"]["original_format"] == "event_json":
        assert row["original"] == Envelope.FromString(value or b"").event
    else:
        assert row["original"] == (value or b"")


def test_wrong_schema_header_is_envelope_decode(pipeline: Pipeline) -> None:
    result = pipeline.process(
        record(envelope({"type": "identify", "userId": "u"}), headers=(("hw-schema", b"envelope/9"),)), never
    )
    assert result.reason is FailureType.ENVELOPE_DECODE


def test_poison_after_bounded_tries(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def explode(*_a: Any, **_k: Any) -> None:
        calls.append(1)
        raise KeyError("boom")

    monkeypatch.setattr(pipeline.enricher, "enrich", explode)
    result = pipeline.process(record(envelope({"type": "identify", "userId": "u"})), never)
    assert result.kind is Kind.DLQ and result.reason is FailureType.POISON
    assert len(calls) == pipeline.settings.poison_max_tries
    assert "KeyError" in BadRow.decode(result.outputs[0].value)["errors"][0]


@pytest.mark.parametrize(
    ("url", "host", "query"),
    [
        ("https://a.b.com", "a.b.com", ""),
        ("https://user:pw@Shop.Example.com:8443/x?utm_source=1#f", "shop.example.com", "utm_source=1"),
        ("https://[::1]:80/?a=1", "::1", "a=1"),
        ("not a url", None, ""),
        ("https://x.com?gclid=1", "x.com", "gclid=1"),
        ("https://x.com/#frag?not=query", "x.com", ""),
    ],
)
def test_url_split(url: str, host: str | None, query: str) -> None:
    assert _split(url) == (host, query)


def test_oversized_output_is_a_size_violation(sources_file: Path) -> None:
    settings = Settings(sources_file=sources_file, max_output_bytes=1024)
    registry = SourceRegistry(sources_file)
    registry.load()
    pipe = Pipeline(settings, registry, Enricher(geoip_path=None, ua_cache_size=1, geo_cache_size=1))
    # Under the input limit, over the output limit once enriched.
    result = pipe.process(record(envelope({"type": "identify", "userId": "u", "traits": {"x": "y" * 900}})), never)
    assert result.reason is FailureType.SIZE_VIOLATION
    assert "enriched event" in BadRow.decode(result.outputs[0].value)["errors"][0]


def test_gc_threshold_cannot_switch_the_collector_off() -> None:
    # gc.set_threshold(0) would disable cyclic garbage collection altogether.
    with pytest.raises(ValidationError, match="gc_young_threshold"):
        Settings(gc_young_threshold=0)
    assert Settings().gc_young_threshold >= 700
