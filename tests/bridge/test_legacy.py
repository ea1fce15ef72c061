"""The legacy record format both ways, PutRecords chunking and shard order: pure code, no servers."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from services.bridge.decoder import BadReason, Bridged, LegacyDecoder, Position, Rejected, Skip
from services.bridge.kinesis import Backoff, ShardInfo, ready_shards
from services.bridge.legacy import LegacyRecord, NotMirrored, infer_type, parse_time_ms, to_legacy
from services.bridge.mirror import chunks
from services.common.badrow import BadRow
from services.common.proto.envelope_pb2 import Envelope
from services.common.sources import SourceRegistry
from tests.bridge.helpers import GO_ZERO, legacy_record

STREAM = "legacy-events"
SOURCES = {
    "sources": [
        {"id": "web", "name": "web", "write_key": "wk-web-secret", "legacy": {"direction": "bridge", "stream": STREAM}},
        {
            "id": "off",
            "name": "off",
            "write_key": "wk-off-secret",
            "enabled": False,
            "legacy": {"direction": "bridge", "stream": STREAM},
        },
        {
            "id": "moved",
            "name": "moved",
            "write_key": "wk-moved-secret",
            "legacy": {"direction": "mirror", "stream": "legacy-other"},
        },
        {"id": "plain", "name": "plain", "write_key": "wk-plain-secret"},
    ]
}
KEYS = ["wk-web-secret", "wk-off-secret", "wk-moved-secret", "wk-plain-secret"]


@pytest.fixture
def registry(tmp_path: Path) -> SourceRegistry:
    path = tmp_path / "sources.json"
    path.write_bytes(orjson.dumps(SOURCES))
    registry = SourceRegistry(path)
    assert registry.load()
    return registry


@pytest.fixture
def decoder(registry: SourceRegistry) -> LegacyDecoder:
    return LegacyDecoder(registry, service="bridge", version="test", max_future_skew_ms=600_000)


AT = Position(STREAM, "shardId-000000000000", "4960001", int(time.time() * 1000))
NOW = (int(time.time() * 1000) // 60_000) * 60_000 - 120_000


def decode(decoder: LegacyDecoder, doc: dict[str, object] | bytes) -> object:
    return decoder.decode(doc if isinstance(doc, bytes) else orjson.dumps(doc), AT)


def assert_no_key(raw: bytes) -> None:
    for key in KEYS:
        assert key.encode() not in raw


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"previousId": "a", "event": "x"}, "alias"),
        ({"groupId": "g", "traits": {"a": 1}}, "group"),
        ({"event": "Clicked", "traits": {"a": 1}}, "track"),
        ({"traits": {"a": 1}}, "identify"),
        ({"name": "Home"}, "page"),
        ({"type": "t"}, "track"),
        ({"type": "screen"}, "screen"),
        ({"userId": "u"}, None),
        ({"type": "nonsense"}, None),
    ],
)
def test_type_inference_follows_the_old_api(fields: dict[str, object], expected: str | None) -> None:
    assert infer_type(fields) == expected


def test_a_typeless_record_becomes_an_envelope_without_its_write_key(decoder: LegacyDecoder) -> None:
    doc = legacy_record("wk-web-secret", typed=False, kind="identify", event_ms=NOW, writeKey="wk-web-secret")
    out = decode(decoder, doc)
    assert isinstance(out, Bridged)
    assert_no_key(out.value)
    envelope = Envelope.FromString(out.value)
    event = orjson.loads(envelope.event)
    assert envelope.source_id == "web" and envelope.message_id == doc["messageId"]
    assert event["type"] == "identify" and "appId" not in event and "writeKey" not in event
    # Go's zero time means absent; the corrected timestamp stays, sentAt moves aside.
    assert "originalTimestamp" not in event and "sentAt" not in event
    assert event["context"]["legacy"]["sentAt"] == doc["sentAt"]
    assert event["timestamp"] == doc["timestamp"] and event["receivedAt"] == doc["receivedAt"]
    assert envelope.received_at_ms == NOW + 120
    assert envelope.client_ip == "81.2.69.142" and envelope.user_agent == "Mozilla/5.0 (legacy test)"
    assert out.key == f"web:{doc['userId']}".encode()
    assert (out.minute_ms, out.type, out.name) == (NOW, "identify", "")


def test_a_record_without_a_message_id_gets_a_stable_one(decoder: LegacyDecoder) -> None:
    doc = legacy_record("wk-web-secret", event_ms=NOW)
    del doc["messageId"]
    first, again = decode(decoder, doc), decode(decoder, doc)
    assert isinstance(first, Bridged) and isinstance(again, Bridged)
    assert first.message_id == again.message_id == f"legacy-{AT.shard_id}-{AT.sequence}"


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (legacy_record("wk-nobody", event_ms=NOW), BadReason.UNKNOWN_WRITE_KEY),
        (legacy_record("wk-off-secret", event_ms=NOW), BadReason.DISABLED_SOURCE),
        (legacy_record("", event_ms=NOW), BadReason.NO_WRITE_KEY),
        (legacy_record("wk-web-secret", typed=False, kind="other", event_ms=NOW), BadReason.TYPE_NOT_INFERABLE),
        (legacy_record("wk-web-secret", event_ms=NOW, timestamp="yesterday"), BadReason.BAD_TIMESTAMP),
    ],
)
def test_bad_records_become_typed_bad_rows_without_keys(
    decoder: LegacyDecoder, doc: dict[str, object], reason: BadReason
) -> None:
    out = decode(decoder, doc)
    assert isinstance(out, Rejected) and out.reason is reason
    raw = out.row.to_json()
    assert_no_key(raw)
    assert b"wk-nobody" not in raw
    row = BadRow.decode(raw)
    assert row["extra"]["reason"] == reason.value
    assert row["extra"]["kinesis"]["sequence"] == AT.sequence
    assert orjson.loads(row["original"])["messageId"] == doc["messageId"]
    if reason is BadReason.UNKNOWN_WRITE_KEY:
        assert len(row["extra"]["write_key_sha256"]) == 12


def test_unparsable_bytes_are_dead_lettered_with_keys_blanked(decoder: LegacyDecoder) -> None:
    out = decode(decoder, b'{"appId": "wk-web-secret", "event": ')
    assert isinstance(out, Rejected) and out.reason is BadReason.INVALID_JSON
    assert_no_key(out.row.to_json())
    assert b"<redacted>" in BadRow.decode(out.row.to_json())["original"]


def test_a_huge_bad_record_is_cut_so_its_row_fits_kafka(decoder: LegacyDecoder) -> None:
    out = decode(decoder, b'{"appId": "wk-web-secret", "blob": "' + b"x" * (1024 * 1024 - 100))
    assert isinstance(out, Rejected)
    raw = out.row.to_json()
    assert len(raw) < 200_000 and out.row.extra["original_truncated_to"] == 64 * 1024
    assert_no_key(raw)


def test_mirrored_and_unbridged_records_are_skipped(decoder: LegacyDecoder) -> None:
    mirrored = legacy_record("wk-web-secret", event_ms=NOW)
    mirrored["context"]["headwater"] = {"mirrored": True}
    assert decode(decoder, mirrored) is Skip.MIRRORED
    assert decode(decoder, legacy_record("wk-plain-secret", event_ms=NOW)) is Skip.NOT_BRIDGED
    assert decode(decoder, legacy_record("wk-moved-secret", event_ms=NOW)) is Skip.NOT_BRIDGED


def test_a_future_event_time_counts_in_the_minute_it_was_received(decoder: LegacyDecoder) -> None:
    doc = legacy_record("wk-web-secret", event_ms=NOW, timestamp="2099-01-01T00:00:00Z")
    out = decode(decoder, doc)
    assert isinstance(out, Bridged) and out.minute_ms == NOW


def test_the_mirror_writes_the_legacy_format_with_the_marker(registry: SourceRegistry, decoder: LegacyDecoder) -> None:
    enriched = {
        "type": "track",
        "event": "Paid",
        "messageId": "m-1",
        "userId": "u1",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "context": {"ip": "1.2.3.4", "geo": {"country": "GB"}},
        "properties": {"revenue": 3},
        "_hw": {"source_id": "moved", "received_at_ms": 1},
    }
    converted = to_legacy(enriched, registry)
    assert isinstance(converted, list) and len(converted) == 1
    out = converted[0]
    assert (out.stream, out.partition_key) == ("legacy-other", "m-1")
    doc = orjson.loads(out.data)
    assert doc["appId"] == "wk-moved-secret"  # the legacy consumers read the write key here
    assert "_hw" not in doc and doc["properties"] == {"revenue": 3}
    assert doc["context"]["headwater"] == {"mirrored": True}
    # A bridge on the same stream skips it, whatever the source's direction.
    assert decoder.decode(out.data, AT) is Skip.MIRRORED
    assert to_legacy({**enriched, "_hw": {"source_id": "web"}}, registry) is NotMirrored.NOT_MIRRORED
    assert to_legacy({**enriched, "_hw": {"source_id": "nobody"}}, registry) is NotMirrored.UNKNOWN_SOURCE
    long_id = to_legacy({**enriched, "messageId": "m" * 300}, registry)
    assert isinstance(long_id, list) and len(long_id[0].partition_key) == 64


def test_put_records_chunks_respect_count_and_size_limits() -> None:
    small = [LegacyRecord("s", f"k{i}", b"x" * 100, "web", f"m{i}") for i in range(1201)]
    assert [len(c) for c in chunks(small, 500, 5 * 1024 * 1024)] == [500, 500, 201]
    big = [LegacyRecord("s", "k", b"x" * (1024 * 1024 - 1), "web", "m") for _ in range(11)]
    sizes = [len(c) for c in chunks(big, 500, 5 * 1024 * 1024)]
    assert sizes == [5, 5, 1]
    for chunk in chunks(big, 500, 5 * 1024 * 1024):
        assert sum(len(r.data) + len(r.partition_key) for r in chunk) <= 5 * 1024 * 1024


def test_children_wait_for_every_listed_parent() -> None:
    shards = [
        ShardInfo("s0", (), True),
        ShardInfo("s1", (), False),
        ShardInfo("s2", ("s0",), False),
        ShardInfo("s3", ("s0",), False),
        ShardInfo("s4", ("s1", "s3"), False),
        ShardInfo("s5", ("gone",), False),
    ]
    assert [s.shard_id for s in ready_shards(shards, set())] == ["s0", "s1", "s5"]
    assert [s.shard_id for s in ready_shards(shards, {"s0"})] == ["s1", "s2", "s3", "s5"]
    assert [s.shard_id for s in ready_shards(shards, {"s0", "s1", "s3"})] == ["s2", "s4", "s5"]


def test_backoff_grows_to_its_bound_and_resets() -> None:
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays[0] <= 0.1 and max(delays) <= 1.0 and delays[-1] >= 0.5
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_the_registry_refuses_a_source_both_bridged_and_mirrored_on_one_stream(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    path.write_bytes(
        orjson.dumps(
            {
                "sources": [
                    {
                        "id": "a",
                        "name": "a",
                        "write_key": "ka",
                        "legacy": [{"direction": "bridge", "stream": "s"}, {"direction": "mirror", "stream": "s"}],
                    }
                ]
            }
        )
    )
    registry = SourceRegistry(path)
    assert not registry.load()
    ok, detail = registry.status()
    assert not ok and "never both" in detail


def test_sources_may_run_different_ways_on_one_stream(tmp_path: Path) -> None:
    """The marker keeps a mirrored record out of the bridge, so a shared legacy stream can
    move over source by source."""
    path = tmp_path / "sources.json"
    path.write_bytes(
        orjson.dumps(
            {
                "sources": [
                    {"id": "a", "name": "a", "write_key": "ka", "legacy": {"direction": "bridge", "stream": "s"}},
                    {
                        "id": "b",
                        "name": "b",
                        "write_key": "kb",
                        "legacy": [{"direction": "mirror", "stream": "s"}, {"direction": "bridge", "stream": "old"}],
                    },
                ]
            }
        )
    )
    registry = SourceRegistry(path)
    assert registry.load()
    a, b = registry.by_id("a"), registry.by_id("b")
    assert a is not None and b is not None
    assert (a.legacy_way("s"), b.legacy_way("s"), b.legacy_way("old"), a.legacy_way("old")) == (
        "bridge",
        "mirror",
        "bridge",
        None,
    )
    mirrored = to_legacy({"type": "track", "event": "E", "messageId": "m", "_hw": {"source_id": "b"}}, registry)
    assert isinstance(mirrored, list) and [r.stream for r in mirrored] == ["s"]
    decoder = LegacyDecoder(registry, service="t", version="t", max_future_skew_ms=0)
    assert decoder.decode(mirrored[0].data, Position("s", "x", "1", NOW)) is Skip.MIRRORED


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-01T07:21:00.123456789Z",
        "2026-12-01T07:21:00Z",
        "2026-12-01T07:21:00.1Z",
        "2026-12-01T07:21:00.12+02:00",
        "2026-12-01T07:21:00.003Z",
        "2026-12-01 07:21:00",
        "1999-12-31T23:59:59.999999Z",
    ],
)
def test_time_parsing_matches_the_standard_parser(text: str) -> None:
    expected = datetime.fromisoformat(text)
    expected = expected if expected.tzinfo else expected.replace(tzinfo=UTC)
    assert parse_time_ms(text) == int(expected.timestamp() * 1000)


@pytest.mark.parametrize("text", [None, "", GO_ZERO, "0001-01-01T00:00:00.000Z"])
def test_absent_times_are_none(text: str | None) -> None:
    assert parse_time_ms(text) is None


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01T00:00:00Z", "2026-12-01T07:21:00.x1Z", 17])
def test_bad_times_raise(text: object) -> None:
    with pytest.raises(ValueError):
        parse_time_ms(text)
