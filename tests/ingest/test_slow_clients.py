"""Slow clients cannot hold ingest: against the running service (its own
process, small limits), connections that send part of their headers, part of a
declared body or nothing are closed in bounded time, those past the connection
cap are answered 503 at once, and a normal client keeps getting 200s throughout."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp

from tests.helpers import eventually
from tests.ingest.conftest import SERVER_KEY, SOURCES, basic
from tests.ingest.helpers import LiveIngest

CAP, IDLE_S, BODY_S = 40, 1.5, 1.5
AUTH = {"Authorization": basic(SERVER_KEY)}


async def _read_until_closed(reader: asyncio.StreamReader, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; fails if it keeps the connection."""
    started = time.monotonic()
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), timeout_s - (time.monotonic() - started))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


async def test_slow_clients_are_closed_and_capped_while_a_normal_client_gets_200s(  # noqa: C901 - one live ingest for every kind of slow client
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    live = LiveIngest(
        tmp_path,
        kafka_bootstrap,
        SOURCES,
        extra_env={
            "HEADWATER_INGEST_MAX_CONNECTIONS": str(CAP),
            "HEADWATER_INGEST_CLIENT_IDLE_TIMEOUT_S": str(IDLE_S),
            "HEADWATER_INGEST_CLIENT_BODY_TIMEOUT_S": str(BODY_S),
        },
    )
    await asyncio.to_thread(live.start)
    host, port = "127.0.0.1", live.port
    statuses: Counter[int] = Counter()
    done = asyncio.Event()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:

            async def normal() -> None:
                for i in range(400):  # bounded; stops when the test is done
                    if done.is_set():
                        return
                    async with http.post(
                        f"{live.url}/v1/track", headers=AUTH, json={"event": "E", "userId": f"n{i}"}
                    ) as resp:
                        statuses[resp.status] += 1
                    await asyncio.sleep(0.05)

            client = asyncio.create_task(normal())
            await eventually(lambda: asyncio.sleep(0, statuses[200] >= 3), 10, "the normal client's first 200s")

            opened: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {
                "partial_headers": [],
                "partial_body": [],
                "silent": [],
            }
            for _ in range(15):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Ty")
                opened["partial_headers"].append((reader, writer))
            for _ in range(15):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(
                    b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Authorization: " + AUTH["Authorization"].encode() + b'\r\nContent-Length: 1000\r\n\r\n{"event": '
                )
                opened["partial_body"].append((reader, writer))
            for _ in range(30):  # 60 slow ones + the normal client: past the cap
                opened["silent"].append(await asyncio.open_connection(host, port))
            for conns in opened.values():
                for _, writer in conns:
                    await writer.drain()

            results = {
                kind: await asyncio.gather(*(_read_until_closed(r, IDLE_S + BODY_S + 5) for r, _ in conns))
                for kind, conns in opened.items()
            }
            refused = [data for conns in results.values() for data, _ in conns if data.startswith(b"HTTP/1.1 503")]
            assert len(refused) >= 60 + 1 - CAP, "the connections past the cap are answered 503"
            body = json.loads(refused[0].split(b"\r\n\r\n", 1)[1])
            assert body["error"] == "too_many_connections" and b"Retry-After: 1" in refused[0]
            timed_out = [data for data, _ in results["partial_body"] if b" 408 " in data.split(b"\r\n")[0]]
            assert timed_out, "a body that stops arriving is answered 408"
            assert b"request_timeout" in timed_out[0]
            # Every slow connection was closed by the server, none later than the limits allow.
            slowest = max(seconds for conns in results.values() for _, seconds in conns)
            assert slowest < IDLE_S + BODY_S + 2, slowest
            for conns in opened.values():
                for _, writer in conns:
                    writer.close()

            # A client trickling its headers is cut off at the idle timeout.
            reader, writer = await asyncio.open_connection(host, port)
            started = time.monotonic()
            closed_after = None
            for byte in b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except ConnectionError:
                    closed_after = time.monotonic() - started
                    break
                if reader.at_eof():
                    closed_after = time.monotonic() - started
                    break
                try:
                    if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                        closed_after = time.monotonic() - started
                        break
                except TimeoutError:
                    pass
            writer.close()
            assert closed_after is not None and closed_after < IDLE_S + 1.5, closed_after

            async with http.get(f"{live.url}/metrics") as resp:
                metrics = await resp.text()
            done.set()
            await client
        assert set(statuses) == {200}, statuses
        assert statuses[200] >= 20
        refused_total = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("headwater_ingest_connections_refused_total")
        )
        assert refused_total >= 60 + 1 - CAP
        open_now = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("headwater_ingest_connections_open")
        )
        assert open_now <= 2
    finally:
        done.set()
        await asyncio.to_thread(live.stop)


def test_the_connection_cap_fits_the_file_descriptor_limit() -> None:
    import resource

    from services.ingest.connections import RESERVED_FDS, usable_connections

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert usable_connections(10) == 10
    if soft != resource.RLIM_INFINITY:
        assert usable_connections(soft * 2) == soft - RESERVED_FDS
