"""The processor against the real Kafka, in this process: fields, DLQ, dedupe, routing."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from services.common.badrow import BadRow, FailureType
from tests.helpers import read_topic
from tests.processor.conftest import (
    GOOGLEBOT_UA,
    IPHONE_UA,
    LONDON_IP,
    SOURCES,
    envelope,
    raw_key,
)
from tests.processor.kafka_helpers import make_settings, produce, running_processor, wait_committed

NewTopic = Callable[..., Awaitable[str]]
NewGroup = Callable[[str], str]


def by_id(records: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        event = orjson.loads(r.value)
        assert event["messageId"] not in out, f"duplicate {event['messageId']}"
        out[event["messageId"]] = event
    return out


async def test_happy_path_field_by_field(
    kafka_bootstrap: str, new_topic: NewTopic, new_group: NewGroup, sources_file: Path, geoip_db: Path
) -> None:
    settings = await make_settings(kafka_bootstrap, new_topic, new_group, sources_file, geoip_path=geoip_db)
    received = int(time.time() * 1000)
    track = {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "anonymousId": None,
        "properties": {"revenue": 12.5, "plan": "pro"},
        "integrations": {"All": True},
        "originalTimestamp": "2026-11-24T14:00:00.000Z",
        "sentAt": "2026-11-24T14:00:02.000Z",
        "context": {
            "ip": LONDON_IP,
            "userAgent": IPHONE_UA,
            "locale": "en-GB",
            "page": {
                "url": "https://shop.example.com/p?utm_source=news&utm_campaign=bf&gclid=abc",
                "referrer": "https://t.co/xyz",
            },
        },
    }
    page = {
        "type": "page",
        "name": "Home",
        "anonymousId": "a1",
        "timestamp": "2026-11-24T15:00:00+01:00",
        "properties": {"url": "https://shop.example.com/"},
    }
    identify = {"type": "identify", "userId": 7, "traits": {"email": "x@example.com"}}
    server = {"type": "track", "event": "Refund", "userId": "u9"}
    produced = [
        (raw_key("web", track), envelope(track, message_id="m-track", received_at_ms=received)),
        (raw_key("web", page), envelope(page, message_id="m-page", received_at_ms=received)),
        (b"web:7", envelope(identify, message_id="m-identify", received_at_ms=received, ua=GOOGLEBOT_UA)),
        (b"server:u9", envelope(server, source_id="server", message_id="m-server", received_at_ms=received)),
    ]
    async with running_processor(settings):
        await produce(kafka_bootstrap, settings.raw_topic, produced)
        enriched = await read_topic(kafka_bootstrap, settings.enriched_topic, expected=4)
        events = by_id(enriched)
        assert set(events) == {"m-track", "m-page", "m-identify", "m-server"}
        assert {r.key for r in enriched} == {b"web:u1", b"web:a1", b"web:7", b"server:u9"}
        assert all(dict(r.headers)["hw-schema"] == b"enriched/1" for r in enriched)

        t = events["m-track"]
        received_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(received / 1000)) + f".{received % 1000:03d}Z"
        assert t["type"] == "track" and t["event"] == "Order Completed" and t["userId"] == "u1"
        assert "anonymousId" not in t
        assert t["properties"] == {"revenue": 12.5, "plan": "pro"}
        assert t["integrations"] == {"All": True}
        assert t["receivedAt"] == received_iso
        assert t["originalTimestamp"] == "2026-11-24T14:00:00.000Z"
        assert t["sentAt"] == "2026-11-24T14:00:02.000Z"
        # Segment's rule: receivedAt - (sentAt - originalTimestamp) = receivedAt - 2 s.
        t_ms = int(time.mktime(time.strptime(t["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))) - time.timezone
        assert t_ms * 1000 + int(t["timestamp"][20:23]) == received - 2000
        ctx = t["context"]
        assert ctx["locale"] == "en-GB"
        assert ctx["ip"] == "81.2.69.0"  # source "web" anonymises, after geo
        assert ctx["geo"] == {
            "country": "GB",
            "region": "ENG",
            "city": "London",
            "latitude": 51.5142,
            "longitude": -0.0931,
            "timeZone": "Europe/London",
        }
        assert ctx["userAgentParsed"]["os"]["family"] == "iOS"
        assert ctx["userAgentParsed"]["device"]["brand"] == "Apple"
        assert ctx["bot"] is False
        assert ctx["campaign"] == {"source": "news", "name": "bf"}
        assert ctx["clickIds"] == {"gclid": "abc"}
        assert ctx["referrer"] == {"url": "https://t.co/xyz", "host": "t.co", "medium": "social"}
        hw = t["_hw"]
        assert hw["source_id"] == "web" and hw["received_at_ms"] == received and hw["flags"] == []
        assert hw["raw"]["topic"] == settings.raw_topic and hw["raw"]["offset"] >= 0
        assert hw["processed_at_ms"] >= received

        p = events["m-page"]
        assert p["name"] == "Home" and p["anonymousId"] == "a1"
        assert p["timestamp"] == "2026-11-24T14:00:00.000Z"
        assert "userAgentParsed" in p["context"] and p["context"]["ip"] == "81.2.69.0"

        i = events["m-identify"]
        assert i["userId"] == "7" and i["traits"] == {"email": "x@example.com"}
        assert i["context"]["bot"] is True

        s = events["m-server"]  # every switch off, ip removed
        assert set(s["context"]) == set()

        # Routing from the sources file.
        warehouse = by_id(await read_topic(kafka_bootstrap, f"{settings.dest_topic_prefix}warehouse", expected=3))
        assert set(warehouse) == {"m-track", "m-page", "m-identify"}
        assert set(by_id(await read_topic(kafka_bootstrap, f"{settings.dest_topic_prefix}crm", expected=1))) == {
            "m-identify"
        }
        assert set(by_id(await read_topic(kafka_bootstrap, f"{settings.dest_topic_prefix}billing", expected=1))) == {
            "m-track"
        }
        assert set(by_id(await read_topic(kafka_bootstrap, f"{settings.dest_topic_prefix}pro", expected=1))) == {
            "m-track"
        }
        assert warehouse["m-track"] == t
    assert await read_topic(kafka_bootstrap, settings.dlq_topic, timeout_s=2) == []


async def test_every_bad_input_goes_to_the_dlq(
    kafka_bootstrap: str, new_topic: NewTopic, new_group: NewGroup, sources_file: Path
) -> None:
    settings = await make_settings(
        kafka_bootstrap, new_topic, new_group, sources_file, partitions=1, max_event_bytes=1024
    )
    bad: list[tuple[bytes | None, FailureType]] = [
        (None, FailureType.ENVELOPE_DECODE),
        (b"\xff\xfe not protobuf", FailureType.ENVELOPE_DECODE),
        (envelope({"type": "identify", "userId": "u"}, source_id=""), FailureType.ENVELOPE_DECODE),
        (envelope(b"{oops"), FailureType.INVALID_JSON),
        (envelope(b'"a string"'), FailureType.INVALID_JSON),
        (envelope({"type": "track", "userId": "u"}), FailureType.SCHEMA_VIOLATION),
        (envelope({"type": "identify"}), FailureType.SCHEMA_VIOLATION),
        (envelope({"type": "group", "userId": "u"}), FailureType.SCHEMA_VIOLATION),
        (envelope({"type": "identify", "userId": "u", "sentAt": "later"}), FailureType.SCHEMA_VIOLATION),
        (envelope({"type": "identify", "userId": "u", "traits": {"big": "x" * 2000}}), FailureType.SIZE_VIOLATION),
    ]
    good = envelope({"type": "identify", "userId": "after-the-bad-ones"}, message_id="good")
    async with running_processor(settings):
        await produce(kafka_bootstrap, settings.raw_topic, [(b"web:u", v) for v, _ in bad] + [(b"web:u", good)])
        rows = await read_topic(kafka_bootstrap, settings.dlq_topic, expected=len(bad))
        enriched = await read_topic(kafka_bootstrap, settings.enriched_topic, expected=1)
    decoded = [BadRow.decode(r.value) for r in rows]
    assert Counter(d["failure_type"] for d in decoded) == Counter(f.value for _, f in bad)
    # Each row points at its input, in order, and keeps the original bytes.
    assert [d["input"]["offset"] for d in decoded] == list(range(len(bad)))
    assert all(dict(r.headers)["hw-schema"] == b"headwater/bad_row/1" for r in rows)
    assert [r.key for r in rows] == [b"unknown"] * 3 + [b"web"] * (len(bad) - 3)
    for d, (value, _) in zip(decoded, bad, strict=True):
        assert d["input"]["topic"] == settings.raw_topic and d["errors"]
        if d["extra"]["original_format"] == "raw_record":
            assert d["original"] == (value or b"")
        else:
            assert d["original"] in (value or b"")
    assert [orjson.loads(r.value)["messageId"] for r in enriched] == ["good"]


async def test_dedupe_within_a_run_and_across_a_restart(
    kafka_bootstrap: str, new_topic: NewTopic, new_group: NewGroup, sources_file: Path
) -> None:
    settings = await make_settings(kafka_bootstrap, new_topic, new_group, sources_file, partitions=2)

    def events(ids: list[str], source: str = "web") -> list[tuple[bytes, bytes]]:
        out = []
        for mid in ids:
            event = {"type": "track", "event": "E", "userId": f"user-{mid}"}
            out.append((raw_key(source, event), envelope(event, source_id=source, message_id=mid)))
        return out

    async with running_processor(settings):
        await produce(kafka_bootstrap, settings.raw_topic, events(["a", "b", "c", "a", "b"]))
        first = await read_topic(kafka_bootstrap, settings.enriched_topic, expected=3)
        assert sorted(orjson.loads(r.value)["messageId"] for r in first) == ["a", "b", "c"]
    # A new process, same group: the window comes back from the changelog.
    async with running_processor(settings):
        # Same messageId from another source is not a duplicate.
        await produce(
            kafka_bootstrap,
            settings.raw_topic,
            events(["a", "c", "d"]) + events(["a"], source="server") + events(["d"]),
        )
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 10)
    records = await read_topic(kafka_bootstrap, settings.enriched_topic, expected=None, timeout_s=10)
    ids = Counter((orjson.loads(r.value)["_hw"]["source_id"], orjson.loads(r.value)["messageId"]) for r in records)
    assert ids == Counter({("web", "a"): 1, ("web", "b"): 1, ("web", "c"): 1, ("web", "d"): 1, ("server", "a"): 1})


async def test_routing_rules_change_without_restart(
    kafka_bootstrap: str, new_topic: NewTopic, new_group: NewGroup, sources_file: Path
) -> None:
    settings = await make_settings(kafka_bootstrap, new_topic, new_group, sources_file, partitions=1)
    event = {"type": "track", "event": "Trial Started", "userId": "u"}
    async with running_processor(settings) as processor:
        await produce(
            kafka_bootstrap, settings.raw_topic, [(b"keep:u", envelope(event, source_id="keep", message_id="before"))]
        )
        await read_topic(kafka_bootstrap, settings.enriched_topic, expected=1)
        changed: dict[str, Any] = orjson.loads(orjson.dumps(SOURCES))
        changed["sources"][2]["destinations"] = [{"name": "trials", "events": ["Trial Started"]}]
        sources_file.write_bytes(orjson.dumps(changed))
        registry = processor.pipeline.registry
        deadline = asyncio.get_running_loop().time() + 20
        while not registry.by_id("keep").destinations:  # type: ignore[union-attr]
            assert asyncio.get_running_loop().time() < deadline, "sources file was not reloaded"
            await asyncio.sleep(0.1)
        await produce(
            kafka_bootstrap, settings.raw_topic, [(b"keep:u", envelope(event, source_id="keep", message_id="after"))]
        )
        trials = await read_topic(kafka_bootstrap, f"{settings.dest_topic_prefix}trials", expected=1)
    assert [orjson.loads(r.value)["messageId"] for r in trials] == ["after"]


async def test_poison_record_goes_to_dlq_and_partition_moves_on(
    kafka_bootstrap: str,
    new_topic: NewTopic,
    new_group: NewGroup,
    sources_file: Path,
) -> None:
    settings = await make_settings(kafka_bootstrap, new_topic, new_group, sources_file, partitions=1)
    async with running_processor(settings) as processor:
        # A bug that only this one event triggers (the enricher is ours, not Kafka: no broker is faked).
        enrich = processor.pipeline.enricher.enrich
        tries: list[str] = []

        def buggy(event: dict[str, Any], **kwargs: Any) -> None:
            if event.get("userId") == "boom":
                tries.append(event["messageId"])
                raise ZeroDivisionError("enrichment bug")
            enrich(event, **kwargs)

        processor.pipeline.enricher.enrich = buggy  # type: ignore[method-assign]
        records = [
            (b"web:u", envelope({"type": "identify", "userId": "u"}, message_id="before")),
            (b"web:boom", envelope({"type": "identify", "userId": "boom"}, message_id="poison")),
            (b"web:u", envelope({"type": "identify", "userId": "u"}, message_id="after")),
        ]
        await produce(kafka_bootstrap, settings.raw_topic, records)
        enriched = await read_topic(kafka_bootstrap, settings.enriched_topic, expected=2)
        rows = await read_topic(kafka_bootstrap, settings.dlq_topic, expected=1)
    assert [orjson.loads(r.value)["messageId"] for r in enriched] == ["before", "after"]
    [row] = [BadRow.decode(r.value) for r in rows]
    assert row["failure_type"] == "poison" and row["message_id"] == "poison" and row["source_id"] == "web"
    assert "ZeroDivisionError" in row["errors"][0]
    assert row["input"]["offset"] == 1 and row["extra"] == {"original_format": "raw_record"}
    assert tries == ["poison"] * settings.poison_max_tries


async def test_dedupe_memory_is_bounded_and_the_newest_keys_come_back(
    kafka_bootstrap: str,
    new_topic: NewTopic,
    new_group: NewGroup,
    sources_file: Path,
) -> None:
    settings = await make_settings(
        kafka_bootstrap,
        new_topic,
        new_group,
        sources_file,
        partitions=1,
        dedupe_max_entries_per_partition=10,
        batch_max_records=5,
    )

    def events(ids: range) -> list[tuple[bytes, bytes]]:
        return [(b"web:u", envelope({"type": "identify", "userId": "u"}, message_id=f"m-{i}")) for i in ids]

    async with running_processor(settings):
        await produce(kafka_bootstrap, settings.raw_topic, events(range(100)))
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 100)
    async with running_processor(settings) as processor:
        deadline = asyncio.get_running_loop().time() + 30
        while not processor._parts:
            assert asyncio.get_running_loop().time() < deadline, "partition never assigned"
            await asyncio.sleep(0.05)
        window = next(iter(processor._parts.values())).window
        assert window is not None
        assert len(window) == 10  # only the newest keys were read back, not the whole changelog
        # Retries of the newest events are dropped; the oldest were evicted, so they pass again.
        await produce(kafka_bootstrap, settings.raw_topic, events(range(95, 100)) + events(range(5)))
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 110)
        assert processor.metrics.duplicates._value.get() == 5
    ids = Counter(
        orjson.loads(r.value)["messageId"]
        for r in await read_topic(kafka_bootstrap, settings.enriched_topic, expected=None)
    )
    assert sum(ids.values()) == 105
    assert {k for k, n in ids.items() if n == 2} == {f"m-{i}" for i in range(5)}


async def test_failed_transactions_lose_and_double_nothing(
    kafka_bootstrap: str, new_topic: NewTopic, new_group: NewGroup, sources_file: Path, monkeypatch: Any
) -> None:
    """Transactions that fail (as when a broker goes away) rewind their partition to the
    committed offset while later batches are already queued behind them. Queued batches
    must be dropped and read again, and records read after the rewind must be kept, also
    at the end of the topic where nothing new arrives while the partition resets."""
    from aiokafka.errors import KafkaConnectionError

    from services.processor.worker import Processor

    settings = await make_settings(
        kafka_bootstrap, new_topic, new_group, sources_file, partitions=2, batch_max_records=15, max_pending_batches=3
    )
    real_commit = Processor._commit
    calls = {"n": 0, "failed": 0, "fail_first": 0}

    async def flaky_commit(self: Processor, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] <= calls["fail_first"] or (calls["n"] % 3 == 1 and calls["failed"] < 12):
            calls["failed"] += 1
            raise KafkaConnectionError("injected: broker went away")
        await real_commit(self, *args, **kwargs)

    monkeypatch.setattr(Processor, "_commit", flaky_commit)

    def wave(start: int, count: int) -> list[tuple[bytes, bytes]]:
        events = [
            {"type": "track", "event": "Tick", "userId": f"u{i % 9}", "messageId": f"m-{i}"}
            for i in range(start, start + count)
        ]
        return [(raw_key("web", e), envelope(e, message_id=e["messageId"])) for e in events]

    async with running_processor(settings):
        await produce(kafka_bootstrap, settings.raw_topic, wave(0, 240))
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 240)
        first_wave_failures = calls["failed"]
        # A small second wave: the first transactions fail with nothing behind them.
        calls["n"], calls["failed"], calls["fail_first"] = 0, 12, 2
        await produce(kafka_bootstrap, settings.raw_topic, wave(240, 10))
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 250)
    assert first_wave_failures >= 5 and calls["failed"] == 14
    enriched = await read_topic(kafka_bootstrap, settings.enriched_topic, expected=250)
    seen = Counter(orjson.loads(r.value)["messageId"] for r in enriched)
    assert sorted(seen) == sorted(f"m-{i}" for i in range(250)), "events lost"
    assert max(seen.values()) == 1, "events doubled"


async def test_a_bug_in_a_queued_batch_stops_the_processor_and_commits_nothing(
    kafka_bootstrap: str, new_topic: NewTopic, new_group: NewGroup, sources_file: Path, monkeypatch: Any
) -> None:
    """A batch failing with something other than a Kafka error (a bug) must end the run
    loop, not be swallowed by the chain of queued batches, and leave no offset behind."""
    from prometheus_client import CollectorRegistry

    from services.common.sources import SourceRegistry
    from services.processor.enrich import Enricher
    from services.processor.metrics import make_metrics
    from services.processor.pipeline import Pipeline
    from services.processor.worker import Processor

    settings = await make_settings(
        kafka_bootstrap, new_topic, new_group, sources_file, partitions=1, batch_max_records=5, max_pending_batches=3
    )

    async def broken_commit(self: Processor, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(Processor, "_commit", broken_commit)
    # One small batch: nothing comes after it, so only the failure itself can stop the loop.
    events = [{"type": "track", "event": "Tick", "userId": "u1", "messageId": f"m-{i}"} for i in range(3)]
    await produce(
        kafka_bootstrap,
        settings.raw_topic,
        [(raw_key("web", e), envelope(e, message_id=e["messageId"])) for e in events],
    )
    registry = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    registry.load()
    processor = Processor(
        settings,
        Pipeline(settings, registry, Enricher(geoip_path=None, ua_cache_size=10, geo_cache_size=10)),
        make_metrics(CollectorRegistry()),
    )
    await processor.start()
    run = asyncio.create_task(processor.run(asyncio.Event()))
    try:
        done, _ = await asyncio.wait([run], timeout=15)
        assert run in done, "the run loop kept going after a batch failed with a bug"
        assert isinstance(run.exception(), RuntimeError) and "injected bug" in str(run.exception())
    finally:
        if not run.done():
            run.cancel()
            await asyncio.wait([run])
        await processor.close()
    from tests.processor.kafka_helpers import committed_total

    assert await committed_total(kafka_bootstrap, settings.group_id, settings.raw_topic) == 0
