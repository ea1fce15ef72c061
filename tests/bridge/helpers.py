"""Helpers for the bridge tests: legacy records, bridge settings and subprocesses."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from services.bridge.settings import Settings
from tests import fleet

REPO = Path(__file__).resolve().parents[2]
GO_ZERO = "0001-01-01T00:00:00Z"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "headwater-dev",
    "AWS_SECRET_ACCESS_KEY": "headwater-dev",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def legacy_record(
    app_id: str, *, message_id: str | None = None, typed: bool = True, kind: str = "track", event_ms: int, **fields: Any
) -> dict[str, Any]:
    """A record as the old event API's Go writer put it on the stream: every time
    field present (Go's zero time where it had none), appId always present."""
    doc: dict[str, Any] = {
        "messageId": message_id or f"legacy-{uuid.uuid4()}",
        "appId": app_id,
        "context": {
            "ip": "81.2.69.142",
            "library": {"name": "analytics.js", "version": "3.0.0"},
            "userAgent": "Mozilla/5.0 (legacy test)",
        },
        "timestamp": iso(event_ms),
        "sentAt": iso(event_ms + 50),
        "receivedAt": iso(event_ms + 120),
        "originalTimestamp": GO_ZERO,
        "userId": f"user-{uuid.uuid4().hex[:4]}",
    }
    if typed:
        doc["type"] = kind
    if kind == "track":
        doc.setdefault("event", "Clicked")
    elif kind == "page":
        doc["name"] = "Home"
    elif kind == "identify":
        doc["traits"] = {"plan": "pro"}
    elif kind == "group":
        doc["groupId"] = "g1"
    elif kind == "alias":
        doc["previousId"] = "old-user"
    doc.update(fields)
    return doc


def bridge_settings(**values: Any) -> Settings:
    base: dict[str, Any] = {
        "lease_duration_s": 4.0,
        "discovery_interval_s": 0.5,
        "idle_poll_s": 0.2,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 1.0,
        "mirror_poll_ms": 100,
        "sources_reload_s": 0.2,
        "http_host": "127.0.0.1",
    }
    base.update(values)
    return Settings(**base)


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_BRIDGE_")}
    env.update(AWS_ENV)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, tuple):
            value = orjson.dumps(list(value)).decode()
        env[f"HEADWATER_BRIDGE_{name.upper()}"] = str(value)
    return env


def start(settings: Settings, command: str, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.bridge", command],
            cwd=REPO,
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout_s: float = 60) -> None:
    await fleet.wait_ready(log_path.stem, proc, port, log_path, timeout_s)


def stop(proc: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    if proc.poll() is None:
        if kill:
            proc.kill()
        else:
            proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def put_legacy(client: Any, stream: str, docs: Iterable[dict[str, Any] | bytes]) -> None:
    """PutRecords as the old API's writer: PartitionKey = messageId; refused records sent again."""
    entries = [
        {
            "Data": d if isinstance(d, bytes) else orjson.dumps(d),
            "PartitionKey": (d.get("messageId") if isinstance(d, dict) else None) or uuid.uuid4().hex,
        }
        for d in docs
    ]
    for start_at in range(0, len(entries), 500):
        pending = entries[start_at : start_at + 500]
        while pending:
            answer = await client.put_records(StreamName=stream, Records=pending)
            pending = [e for e, r in zip(pending, answer["Records"], strict=True) if r.get("ErrorCode")]
            if pending:
                await asyncio.sleep(0.1)


async def read_stream(client: Any, stream: str) -> list[dict[str, Any]]:
    """Every record of every shard from the start (for checks; not a bridge)."""
    out: list[dict[str, Any]] = []
    shards = (await client.list_shards(StreamName=stream))["Shards"]
    for shard in shards:
        it = (
            await client.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        while it:
            answer = await client.get_records(ShardIterator=it, Limit=10_000)
            out.extend(answer["Records"])
            if not answer["Records"] and answer.get("MillisBehindLatest", 0) == 0:
                break
            it = answer.get("NextShardIterator")
    return out
