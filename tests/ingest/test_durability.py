"""Accepted events are never lost: Kafka stopped mid-traffic, ingest killed while spooling.

Both tests use a private Kafka broker (its own ports and data) so stopping it
disturbs no other test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from services.devstack import stack
from tests.helpers import eventually, free_port, read_topic, unique_name
from tests.ingest.conftest import SERVER_KEY, IngestClient, basic, decode

AUTH = {"Authorization": basic(SERVER_KEY)}


def _batch(prefix: str, i: int, size: int = 5) -> dict[str, Any]:
    return {
        "batch": [
            {"type": "track", "event": "Tick", "userId": f"u{(i * size + j) % 7}", "messageId": f"{prefix}-{i}-{j}"}
            for j in range(size)
        ]
    }


async def _message_ids(bootstrap: str, topic: str, wanted: set[str], timeout_s: float = 90) -> Counter[str]:
    """Every messageId on the topic, read until all of ``wanted`` are there (duplicates
    make a record count an unreliable stop) or the deadline passes."""
    seen: Counter[str] = Counter()

    async def complete() -> bool:
        records = await read_topic(bootstrap, topic, expected=None, timeout_s=10)
        seen.clear()
        seen.update(decode(r)[0].message_id for r in records)
        return wanted <= set(seen)

    try:
        await eventually(complete, timeout_s, "every acknowledged event in Kafka")
    except AssertionError:
        pass  # the caller reports exactly what is missing
    return seen


async def test_kafka_stopped_mid_traffic_loses_nothing(
    ingest: IngestClient, private_stack: stack.StackSettings
) -> None:
    await asyncio.to_thread(stack.up, private_stack, cassandra=False)
    bootstrap = private_stack.kafka_bootstrap
    client, settings = await ingest(kafka_bootstrap=bootstrap, kafka_ack_timeout_s=1.0)
    acked: list[str] = []
    statuses: Counter[int] = Counter()

    async def send(i: int) -> None:
        body = _batch("kstop", i)
        resp = await client.post("/v1/batch", json=body, headers=AUTH)
        statuses[resp.status] += 1
        if resp.status == 200:
            acked.extend(e["messageId"] for e in body["batch"])

    for i in range(40):
        await send(i)
    await asyncio.to_thread(stack.kafka_server(private_stack).stop)  # Kafka goes away mid-traffic
    for i in range(40, 100):
        await send(i)
    ready = await (await client.get("/readyz")).json()
    assert ready["checks"]["kafka"]["detail"].startswith("spooling")
    metrics = await (await client.get("/metrics")).text()
    assert "headwater_ingest_spooling 1.0" in metrics

    await asyncio.to_thread(stack.up, private_stack, cassandra=False)  # and comes back
    for i in range(100, 120):
        await send(i)

    async def drained() -> bool:
        body = await (await client.get("/readyz")).json()
        return bool(body["checks"]["kafka"]["detail"] == "kafka")

    await eventually(drained, 90, "the spool to drain")
    assert statuses == {200: 120}
    seen = await _message_ids(bootstrap, settings.raw_topic, set(acked))
    missing = set(acked) - set(seen)
    duplicates = sum(n - 1 for n in seen.values())
    print(f"acked={len(acked)} delivered={sum(seen.values())} duplicates={duplicates}")
    assert not missing, f"{len(missing)} acknowledged events lost"


def _start_ingest(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.ingest"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


async def _wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as http:

        async def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(up, 30, "ingest to start")


async def test_kill_9_while_spooling_then_restart_delivers_every_acked_event(
    private_stack: stack.StackSettings, sources_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    raw_topic = unique_name("test.events.raw")
    env = {
        **os.environ,
        "HEADWATER_INGEST_HTTP_HOST": "127.0.0.1",
        "HEADWATER_INGEST_HTTP_PORT": str(port),
        "HEADWATER_INGEST_KAFKA_BOOTSTRAP": private_stack.kafka_bootstrap,  # nothing there yet
        "HEADWATER_INGEST_RAW_TOPIC": raw_topic,
        "HEADWATER_INGEST_DLQ_TOPIC": unique_name("test.events.dlq"),
        "HEADWATER_INGEST_SPOOL_DIR": str(tmp_path / "spool"),
        "HEADWATER_INGEST_SOURCES_FILE": str(sources_file),
        "HEADWATER_INGEST_KAFKA_ACK_TIMEOUT_S": "1.0",
    }
    log = tmp_path / "ingest.log"
    proc = _start_ingest(env, log)
    acked: list[str] = []
    try:
        await _wait_healthy(port, proc, log)
        async with aiohttp.ClientSession() as http:

            async def send(i: int) -> None:
                body = _batch("kill9", i)
                try:
                    async with http.post(f"http://127.0.0.1:{port}/v1/batch", json=body, headers=AUTH) as resp:
                        if resp.status == 200:
                            acked.extend(e["messageId"] for e in body["batch"])
                except aiohttp.ClientError:
                    pass  # in flight when the process died: never acknowledged

            for i in range(30):
                await send(i)
            # Kill while many requests are in flight, mid-append.
            tasks = [asyncio.create_task(send(i)) for i in range(30, 400)]
            while len(acked) < 1000 and not all(t.done() for t in tasks):
                await asyncio.sleep(0.001)
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.gather(*tasks)
            print(f"acked before the kill: {len(acked)} of {400 * 5} events sent")
        proc.wait()
        assert len(acked) >= 150
        assert any((tmp_path / "spool").rglob("seg-*.log"))

        await asyncio.to_thread(stack.up, private_stack, cassandra=False)
        proc = _start_ingest(env, log)
        await _wait_healthy(port, proc, log)
        seen = await _message_ids(private_stack.kafka_bootstrap, raw_topic, set(acked))
        missing = set(acked) - set(seen)
        print(f"acked={len(acked)} delivered={sum(seen.values())} duplicates={sum(n - 1 for n in seen.values())}")
        assert not missing, f"{len(missing)} acknowledged events lost: {sorted(missing)[:5]}"
        for event_id in seen:
            assert event_id.startswith("kill9-")
        assert json.loads(Path(sources_file).read_text())  # the registry file was used as given
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
