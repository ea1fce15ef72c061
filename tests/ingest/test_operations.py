"""Operations: live source reloads, a full spool, SIGTERM drain, several workers on one port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path

import aiohttp

from tests.helpers import eventually, free_port, unique_name
from tests.ingest.conftest import SERVER_KEY, SOURCES, IngestClient, basic
from tests.ingest.test_durability import _message_ids, _start_ingest, _wait_healthy

AUTH = {"Authorization": basic(SERVER_KEY)}
EVENT = {"event": "E", "userId": "u"}


async def test_registry_reloads_live_and_keeps_the_last_good_copy(ingest: IngestClient, sources_file: Path) -> None:
    client, _ = await ingest(sources_reload_s=0.1)
    new_key = {"Authorization": basic("added-later")}
    assert (await client.post("/v1/track", json=EVENT, headers=new_key)).status == 401

    sources_file.write_text("{ this is not json")

    async def degraded() -> bool:
        ready = await (await client.get("/readyz")).json()
        return "last good copy" in ready["checks"]["sources"]["detail"]

    await eventually(degraded, 10, "/readyz to report the unreadable registry")
    assert (await client.get("/readyz")).status == 200  # still serving
    assert (await client.post("/v1/track", json=EVENT, headers=AUTH)).status == 200

    changed = {"sources": [*SOURCES["sources"], {"id": "late", "name": "Late", "write_key": "added-later"}]}
    sources_file.write_text(json.dumps(changed))

    async def reloaded() -> bool:
        return (await client.post("/v1/track", json=EVENT, headers=new_key)).status == 200

    await eventually(reloaded, 10, "the new source to be accepted")


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_full_spool_answers_503_with_retry_after(ingest: IngestClient) -> None:
    client, _ = await ingest(kafka_bootstrap=_closed_port(), spool_max_bytes=4096, kafka_ack_timeout_s=0.5)
    statuses = []
    for _ in range(40):
        resp = await client.post("/v1/track", json={**EVENT, "properties": {"pad": "x" * 200}}, headers=AUTH)
        statuses.append(resp.status)
        if resp.status == 503:
            assert resp.headers["Retry-After"] == "5"
            assert (await resp.json())["error"] == "unavailable"
            break
    assert statuses[0] == 200 and statuses[-1] == 503
    ready = await (await client.get("/readyz")).json()
    assert "spooling: kafka down" in ready["checks"]["kafka"]["detail"]


async def test_sigterm_drains_in_flight_requests_and_two_workers_share_the_port(
    kafka_bootstrap: str, sources_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    raw_topic = unique_name("test.events.raw")
    env = {
        **os.environ,
        "HEADWATER_INGEST_HTTP_HOST": "127.0.0.1",
        "HEADWATER_INGEST_HTTP_PORT": str(port),
        "HEADWATER_INGEST_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HEADWATER_INGEST_RAW_TOPIC": raw_topic,
        "HEADWATER_INGEST_DLQ_TOPIC": unique_name("test.events.dlq"),
        "HEADWATER_INGEST_SPOOL_DIR": str(tmp_path / "spool"),
        "HEADWATER_INGEST_SOURCES_FILE": str(sources_file),
        "HEADWATER_INGEST_WORKERS": "2",
    }
    log = tmp_path / "ingest.log"
    proc = _start_ingest(env, log)
    await _wait_healthy(port, proc, log)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(workers) == 2, "two worker processes"
    acked_ids: list[str] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

        async def send(i: int) -> None:
            ids = [f"drain-{i}-{j}" for j in range(10)]
            body = {"batch": [{"type": "track", "event": "E", "userId": f"u{i}", "messageId": m} for m in ids]}
            try:
                async with http.post(f"http://127.0.0.1:{port}/v1/batch", json=body, headers=AUTH) as resp:
                    if resp.status == 200:
                        acked_ids.extend(ids)
            except aiohttp.ClientError:
                pass  # refused after the stop began: never acknowledged

        await asyncio.gather(*(send(i) for i in range(50)))
        tasks = [asyncio.create_task(send(i)) for i in range(50, 250)]
        await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
    assert len(acked_ids) >= 500
    assert await asyncio.to_thread(proc.wait, 60) == 0
    seen = await _message_ids(kafka_bootstrap, raw_topic, set(acked_ids))
    missing = set(acked_ids) - set(seen)
    assert not missing, f"{len(missing)} acknowledged events missing after SIGTERM"
    assert "draining" in log.read_text()


def _accepted(metrics_text: str) -> float:
    """headwater_ingest_events_total{outcome="accepted"} of one scrape."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("headwater_ingest_events_total{") and 'outcome="accepted"' in line
    )


async def test_each_worker_serves_its_own_metrics_port_and_together_they_count_every_event(
    kafka_bootstrap: str, sources_file: Path, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    while metrics_port + 1 == port or not _is_free(metrics_port + 1):
        metrics_port = free_port()
    env = {
        **os.environ,
        "HEADWATER_INGEST_HTTP_HOST": "127.0.0.1",
        "HEADWATER_INGEST_HTTP_PORT": str(port),
        "HEADWATER_INGEST_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HEADWATER_INGEST_RAW_TOPIC": unique_name("test.events.raw"),
        "HEADWATER_INGEST_DLQ_TOPIC": unique_name("test.events.dlq"),
        "HEADWATER_INGEST_SPOOL_DIR": str(tmp_path / "spool"),
        "HEADWATER_INGEST_SOURCES_FILE": str(sources_file),
        "HEADWATER_INGEST_WORKERS": "2",
        "HEADWATER_INGEST_METRICS_PORT": str(metrics_port),
    }
    log = tmp_path / "ingest.log"
    proc = _start_ingest(env, log)
    try:
        await _wait_healthy(port, proc, log)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

            async def scrape(p: int) -> str:
                async with http.get(f"http://127.0.0.1:{p}/metrics") as answer:
                    assert answer.status == 200
                    return await answer.text()

            async def both_up() -> bool:
                try:
                    await asyncio.gather(scrape(metrics_port), scrape(metrics_port + 1))
                except aiohttp.ClientError:
                    return False
                return True

            await eventually(both_up, 30, "both workers' metrics ports to answer")
            for i in range(60):  # a new connection each: the kernel spreads them over the workers
                async with http.post(
                    f"http://127.0.0.1:{port}/v1/track", json={**EVENT, "messageId": f"w-{i}"}, headers=AUTH
                ) as answer:
                    assert answer.status == 200
            counts = [_accepted(await scrape(p)) for p in (metrics_port, metrics_port + 1)]
            assert sum(counts) == 60, counts
            # Through the shared port a scrape reaches one worker: only its own count.
            assert _accepted(await scrape(port)) in counts
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
