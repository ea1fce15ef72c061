"""Hostile and careless requests against the metrics service running as its own process:
KairosDB-style 400/413 answers, never a 5xx, and a peak RSS that stays under a bound."""

from __future__ import annotations

import asyncio
import gzip
import io
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.helpers import free_port
from tests.metrics.conftest import MakeSettings
from tests.metrics.helpers import service_env

HOUR = 3_600_000
# Peak resident memory the service may reach over the whole test (measured: 353 MB, 91 MB at start).
RSS_BOUND_MB = 600


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
async def service(metrics_settings: MakeSettings, tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """The service as a process: (base URL, pid)."""
    settings = await metrics_settings(partitions=1, query_max_rows=100_000, write_max_points=200_000)
    port = free_port()
    log = (tmp_path / "metrics.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.metrics",
        env=service_env(settings, port),
        stdout=log,
        stderr=log,
        cwd=Path(__file__).parents[2],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 90
            while True:
                try:
                    async with session.get(url + "/api/v1/health/check") as resp:
                        if resp.status == 204:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.returncode is None, (tmp_path / "metrics.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the service did not start"
                await asyncio.sleep(0.5)
        yield url, proc.pid
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


def big_body(points: int, start: int) -> bytes:
    """One metric with ``points`` points, built as bytes (about 24 bytes a point)."""
    pts = b",".join(b"[%d,%d]" % (start + i, i) for i in range(points))
    return b'[{"name":"big.series","tags":{"host":"a"},"datapoints":[' + pts + b"]}]"


async def post(session: aiohttp.ClientSession, url: str, data: bytes, **headers: str) -> tuple[int, Any]:
    async with session.post(
        url, data=io.BytesIO(data), headers={"Content-Type": "application/json", **headers}
    ) as resp:
        text = await resp.read()
        return resp.status, orjson.loads(text) if text else None


@pytest.mark.slow
async def test_hostile_requests_get_kairosdb_errors_and_memory_stays_bounded(service: tuple[str, int]) -> None:
    url, pid = service
    start = (int(time.time() * 1000) // HOUR - 3) * HOUR
    baseline = peak_rss_mb(pid)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session:
        # ~700k points in a 16 MB body, four at once: over the cap, refused, parsed one at a time
        # in a worker thread while the loop keeps answering.
        huge = big_body(680_000, start)
        assert len(huge) < 16 * 1024 * 1024
        health = asyncio.create_task(session.get(url + "/api/v1/health/check"))
        answers = await asyncio.gather(*(post(session, url + "/api/v1/datapoints", huge) for _ in range(4)))
        for status, answer in answers:
            assert status == 400 and "at most 200000 data points" in answer["errors"][0]
        assert (await health).status == 204
        health.result().release()
        # The same gzipped, and a gzip bomb: 400 and 413, both KairosDB-shaped.
        status, answer = await post(
            session, url + "/api/v1/datapoints", gzip.compress(huge), **{"Content-Type": "application/gzip"}
        )
        assert status == 400 and answer["errors"]
        status, answer = await post(
            session,
            url + "/api/v1/datapoints",
            gzip.compress(b" " * (64 << 20)),
            **{"Content-Type": "application/gzip"},
        )
        assert status == 413 and answer["errors"]
        status, answer = await post(session, url + "/api/v1/datapoints", b"[" * 17_000_000)
        assert status == 413 and answer["errors"]
        # Too many metric names, too many tags.
        many = orjson.dumps([{"name": f"m{i}", "tags": {"h": "a"}, "datapoints": [[start, 1]]} for i in range(10_001)])
        status, answer = await post(session, url + "/api/v1/datapoints", many)
        assert status == 400 and "metrics" in answer["errors"][0]
        tags = orjson.dumps([{"name": "t", "tags": {f"k{i}": "v" for i in range(65)}, "datapoints": [[start, 1]]}])
        status, answer = await post(session, url + "/api/v1/datapoints", tags)
        assert status == 400 and "tags" in answer["errors"][0]

        # Under the caps: stored. A limit stops the read; past query_max_rows is a 400.
        status, _ = await post(session, url + "/api/v1/datapoints", big_body(120_000, start))
        assert status == 204
        window = {"start_absolute": start, "end_absolute": start + HOUR}
        status, answer = await post(
            session,
            url + "/api/v1/datapoints/query",
            orjson.dumps({**window, "metrics": [{"name": "big.series", "limit": 1000}]}),
        )
        assert status == 200
        (q,) = answer["queries"]
        assert q["sample_size"] == 1000 and len(q["results"][0]["values"]) == 1000
        status, answer = await post(
            session, url + "/api/v1/datapoints/query", orjson.dumps({**window, "metrics": [{"name": "big.series"}]})
        )
        assert status == 400 and "more than 100000 rows" in answer["errors"][0]
        # Every empty 1 ms period of the hour marked: refused, not built.
        status, answer = await post(
            session,
            url + "/api/v1/datapoints/query",
            orjson.dumps(
                {
                    **window,
                    "metrics": [
                        {
                            "name": "big.series",
                            "limit": 10,
                            "aggregators": [{"name": "gaps", "sampling": {"value": 1, "unit": "milliseconds"}}],
                        }
                    ],
                }
            ),
        )
        assert status == 400 and "gaps" in answer["errors"][0]
    peak = peak_rss_mb(pid)
    print(f"metrics service peak RSS: {peak:.0f} MB (at start {baseline:.0f} MB, bound {RSS_BOUND_MB} MB)")
    assert peak < RSS_BOUND_MB
