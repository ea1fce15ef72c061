"""Test helpers: enriched events, a source file, an independent expected rollup,
and reading the rollup tables back."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from services.common.cassandra import CassandraClient
from services.metrics.rollup import union_estimate
from services.metrics.settings import Settings
from tests.helpers import free_port

RES_MS = {"1m": 60_000, "1h": 3_600_000, "1d": 86_400_000}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def enriched(
    source: str,
    etype: str,
    name: str | None,
    user: str | None,
    time_ms: int,
    received_ms: int,
    props: dict[str, Any] | None = None,
    message_id: str = "m",
) -> dict[str, Any]:
    """An events.enriched value as the processor writes it (the fields metrics reads, and a few more)."""
    doc: dict[str, Any] = {
        "type": etype,
        "messageId": message_id,
        "timestamp": iso(time_ms),
        "receivedAt": iso(received_ms),
        "properties": props or {},
        "context": {"library": {"name": "test"}},
        "_hw": {
            "source_id": source,
            "received_at_ms": received_ms,
            "processed_at_ms": received_ms + 5,
            "raw": {"topic": "events.raw", "partition": 0, "offset": 0},
            "flags": [],
        },
    }
    if user is not None:
        doc["userId" if user.startswith("u") else "anonymousId"] = user
    if etype == "track":
        doc["event"] = name
    elif etype in ("page", "screen"):
        doc["name"] = name
    return doc


def write_sources(path: Path, sums: dict[str, list[str]]) -> Path:
    path.write_text(
        json.dumps(
            {
                "sources": [
                    {"id": sid, "name": sid, "write_key": f"{sid}-key", "sum_properties": props}
                    for sid, props in sums.items()
                ]
            }
        )
    )
    return path


@dataclass
class Sent:
    partition: int
    offset: int
    doc: dict[str, Any] | None  # None: a record that is not an event


async def produce(bootstrap: str, topic: str, records: list[tuple[int, bytes]]) -> list[Sent]:
    """Send (partition, value) records in order; returns where each landed."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=b"k", partition=p) for p, value in records]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    out = []
    for (p, value), meta in zip(records, metas, strict=True):
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            doc = None
        out.append(Sent(p, meta.offset, doc if isinstance(doc, dict) and "_hw" in doc else None))
    return out


def parse_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def expected(
    sent: list[Sent], max_age_ms: int, sums: dict[str, list[str]], retention_ms: dict[str, int] | None = None
) -> tuple[dict[tuple[str, str, str, str, int], dict[str, Any]], set[tuple[int, int]]]:
    """Windows computed straight from the input, written independently of the service's code.

    Key (resolution, source, type, event, window_start) -> {count, users (set), sums}. An
    event counts in every window whatever order it arrived in, unless it is older (receivedAt
    minus timestamp) than ``max_age_ms``, or than a resolution's retention for that resolution.
    Also the (partition, offset) of every event that some resolution did not take (the late topic).
    """
    windows: dict[tuple[str, str, str, str, int], dict[str, Any]] = defaultdict(
        lambda: {"count": 0, "users": set(), "sums": defaultdict(float)}
    )
    late: set[tuple[int, int]] = set()
    for s in sent:
        if s.doc is None:
            continue
        d = s.doc
        t = parse_ms(d["timestamp"])
        age = d["_hw"]["received_at_ms"] - t
        kept = [] if age > max_age_ms else [r for r in RES_MS if retention_ms is None or age <= retention_ms[r]]
        if len(kept) < len(RES_MS):
            late.add((s.partition, s.offset))
        name = d.get("event") if d["type"] == "track" else d.get("name") if d["type"] in ("page", "screen") else ""
        user = d.get("userId") or d.get("anonymousId")
        for res in kept:
            size = RES_MS[res]
            w = windows[(res, d["_hw"]["source_id"], d["type"], name or "", t - t % size)]
            w["count"] += 1
            if user:
                w["users"].add(user)
            for prop in sums.get(d["_hw"]["source_id"], []):
                v = d.get("properties", {}).get(prop)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    w["sums"][prop] += v
    return dict(windows), late


async def all_rows(client: CassandraClient, cql: str) -> list[Any]:
    """Every page of a read (the async client's execute returns the first page only)."""
    return await asyncio.to_thread(lambda: list(client.session.execute(cql, timeout=30)))


async def stored_windows(
    client: CassandraClient, ks: str, lg_k: int = 12
) -> dict[tuple[str, str, str, str, int], dict[str, Any]]:
    """Every window in the rollup tables, partitions added up (counts, sums) and unioned (users)."""
    out: dict[tuple[str, str, str, str, int], dict[str, Any]] = {}
    for res in RES_MS:
        rows = await all_rows(
            client, f"SELECT source, window_start, type, event, count, users, sums FROM {ks}.rollup_{res}"
        )
        acc: dict[tuple[str, str, str, str, int], dict[str, Any]] = defaultdict(
            lambda: {"count": 0, "blobs": [], "sums": defaultdict(float)}
        )
        for r in rows:
            w = acc[(res, r.source, r.type, r.event, r.window_start)]
            w["count"] += r.count
            w["blobs"].append(bytes(r.users or b""))
            for k, v in (r.sums or {}).items():
                w["sums"][k] += v
        for key, w in acc.items():
            out[key] = {"count": w["count"], "users": union_estimate(w["blobs"], lg_k), "sums": dict(w["sums"])}
    return out


def assert_windows_equal(
    stored: dict[tuple[str, str, str, str, int], dict[str, Any]],
    want: dict[tuple[str, str, str, str, int], dict[str, Any]],
) -> None:
    assert set(stored) == set(want), (
        "stored only",
        sorted(set(stored) - set(want))[:3],
        "input only",
        sorted(set(want) - set(stored))[:3],
    )
    for key, w in want.items():
        got = stored[key]
        assert got["count"] == w["count"], (key, got["count"], w["count"])
        # HLL: exact in its small-cardinality mode; allow the sketch's error beyond that.
        n = len(w["users"])
        assert abs(got["users"] - n) <= max(0.5, 0.03 * n), (key, got["users"], n)
        for prop, total in w["sums"].items():
            assert math.isclose(got["sums"].get(prop, 0.0), total, rel_tol=1e-9, abs_tol=1e-6), (key, prop)
        assert set(got["sums"]) <= set(w["sums"]), key


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Call ``check`` (a real client call) until it is true or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def checkpoints(client: CassandraClient, ks: str, group: str, topic: str) -> dict[int, int]:
    try:
        rows = await client.execute(
            f"SELECT kpart, next_offset FROM {ks}.checkpoints WHERE consumer_group = %s AND topic = %s", (group, topic)
        )
    except Exception:  # the keyspace does not exist yet
        return {}
    return {r.kpart: r.next_offset for r in rows}


def end_offsets(sent: list[Sent]) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in sent:
        out[s.partition] = max(out.get(s.partition, 0), s.offset + 1)
    return out


def service_env(settings: Settings, port: int) -> dict[str, str]:
    """The environment that configures the metrics service as ``settings`` say, on ``port``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_METRICS_")}
    for name, value in settings.model_dump(exclude={"service_name"}).items():
        if value is None:
            continue
        if isinstance(value, tuple):
            value = orjson.dumps(list(value)).decode()
        elif hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"HEADWATER_METRICS_{name.upper()}"] = str(value)
    env["HEADWATER_METRICS_HTTP_PORT"] = str(port)
    return env


async def start_service(settings: Settings, log_path: Path, *, port: int | None = None) -> asyncio.subprocess.Process:
    """The metrics service as its own process, configured from ``settings`` through its environment."""
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.metrics",
            env=service_env(settings, port or free_port()),
            stdout=log,
            stderr=log,
            cwd=Path(__file__).parents[2],
        )


def count_body(start: int, end: int, group: str = "source", tags: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """A KairosDB query: events per value of one tag in [start, end] at 1-minute resolution."""
    return {
        "start_absolute": start,
        "end_absolute": end,
        "metrics": [
            {
                "name": "headwater.events.count",
                "tags": {"resolution": ["1m"], **(tags or {})},
                "group_by": [{"name": "tag", "tags": [group]}],
            }
        ],
    }


def counts(answer: dict[str, Any], group: str = "source") -> dict[str, int]:
    """The answer to count_body(): value of the grouped tag -> events, partitions added up."""
    out: dict[str, int] = {}
    for result in answer["queries"][0]["results"]:
        if result["values"]:
            (value,) = result["tags"][group]
            out[value] = sum(v for _, v in result["values"])
    return out
