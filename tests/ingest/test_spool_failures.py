"""The spool under failing disks, against the real Kafka: a disk that fills while
ingest spools under load, then space comes back; bytes flipped in segments.

The full-disk test runs ingest in a subprocess under a file-size limit
(RLIMIT_FSIZE: a write past it fails with EFBIG, like ENOSPC on a full disk,
part-way through a frame) and raises the limit from here with prlimit, so no
mount is needed. Its output goes through a pipe: a log file would be under the
same limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from services.common.kafkawriter import OutRecord
from services.devstack import stack
from services.ingest.envelope import EnvelopeWriter
from services.ingest.spool import Spool
from services.ingest.spoolfile import read_frames
from tests.helpers import eventually, free_port, read_topic, unique_name
from tests.ingest.conftest import SERVER_KEY, IngestClient, basic, decode
from tests.ingest.test_durability import _message_ids

AUTH = {"Authorization": basic(SERVER_KEY)}
FSIZE_LIMIT = 48 * 1024


def _batch(i: int, size: int = 5) -> dict[str, Any]:
    return {
        "batch": [
            {
                "type": "track",
                "event": "Tick",
                "userId": f"u{j}",
                "messageId": f"full-{i}-{j}",
                "properties": {"pad": "x" * 100},
            }
            for j in range(size)
        ]
    }


async def _start(env: dict[str, str], out: list[bytes], limit: int | None) -> asyncio.subprocess.Process:
    def limited() -> None:  # runs in the child before exec
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.ingest",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=limited,
    )

    async def pump() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            out.append(line)

    task = asyncio.create_task(pump())
    proc._pump = task  # type: ignore[attr-defined]  # kept referenced until the process ends
    return proc


async def _healthy(http: aiohttp.ClientSession, port: int, proc: asyncio.subprocess.Process, out: list[bytes]) -> None:
    async def up() -> bool:
        assert proc.returncode is None, b"".join(out[-40:]).decode()
        try:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(up, 30, "ingest to start")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    await proc._pump  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_disk_fills_while_spooling_then_space_comes_back(
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
        # Larger than the file-size limit: the active segment hits the "full disk" mid-frame.
        "HEADWATER_INGEST_SPOOL_SEGMENT_BYTES": str(4 * FSIZE_LIMIT),
    }
    out: list[bytes] = []
    proc = await _start(env, out, FSIZE_LIMIT)
    acked: list[str] = []
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()
    counter = iter(range(1_000_000))
    try:
        async with aiohttp.ClientSession() as http:
            await _healthy(http, port, proc, out)

            async def load() -> None:
                for _ in range(3000):  # bounded: stops at the event or after this many
                    if stop.is_set():
                        return
                    body = _batch(next(counter))
                    async with http.post(f"http://127.0.0.1:{port}/v1/batch", json=body, headers=AUTH) as resp:
                        statuses[resp.status] += 1
                        if resp.status == 200:
                            acked.extend(e["messageId"] for e in body["batch"])
                        else:
                            await asyncio.sleep(0.02)

            workers = [asyncio.create_task(load()) for _ in range(6)]

            async def full() -> bool:
                return statuses[503] >= 20

            await eventually(full, 60, "the disk to fill (503s)")
            acked_while_full = len(acked)
            # Kafka comes back while the disk is still full: the drainer drains while
            # writes keep failing part-way through frames.
            await asyncio.to_thread(stack.up, private_stack, cassandra=False)
            await asyncio.sleep(3)
            resource.prlimit(
                proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            )  # space comes back
            await asyncio.sleep(3)
            stop.set()
            await asyncio.gather(*workers)

            # A restart must keep every acknowledged frame still in the spool.
            await _stop(proc)
            proc = await _start(env, out, None)
            await _healthy(http, port, proc, out)

            async def drained() -> bool:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    body = await resp.json()
                return bool(body["checks"]["kafka"]["detail"] == "kafka")

            await eventually(drained, 90, "the spool to drain")
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert "0 events pending" in (await resp.json())["checks"]["spool"]["detail"]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[200] > 0 and statuses[503] >= 20 and acked_while_full > 0
        seen = await _message_ids(private_stack.kafka_bootstrap, raw_topic, set(acked))
        missing = set(acked) - set(seen)
        print(f"statuses={dict(statuses)} acked={len(acked)} delivered={sum(seen.values())}")
        assert not missing, f"{len(missing)} acknowledged events lost: {sorted(missing)[:5]}"
        log = b"".join(out)
        assert b"spool write failed" in log
        assert not list((tmp_path / "spool").rglob("damaged/seg-*")), "a full disk is not damage"
    finally:
        stop.set()
        await _stop(proc)


def _records(topic: str, prefix: str, n: int) -> list[OutRecord]:
    writer = EnvelopeWriter(
        source_id="server", received_at_ms=1, client_ip="127.0.0.1", user_agent="t", request_id="r", path="/v1/track"
    )
    return [
        OutRecord(
            topic,
            f"server:u{i}".encode(),
            writer.encode(
                f"{prefix}-{i}",
                orjson.dumps({"type": "track", "event": "E", "userId": f"u{i}", "messageId": f"{prefix}-{i}"}),
            ),
        )
        for i in range(n)
    ]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


async def test_flipped_bytes_in_the_spool_deliver_the_rest_and_keep_the_damage(
    ingest: IngestClient, ingest_settings: Any, kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = ingest_settings()
    folder = settings.spool_dir / "worker-0"
    records = _records(settings.raw_topic, "rot", 30)
    spool = Spool(folder, max_bytes=10_000_000, segment_bytes=10**9)
    spool.open()
    await spool.append(records[:10])  # segment 1: a payload byte flips in frame 3
    await spool.close()
    spool = Spool(folder, max_bytes=10_000_000, segment_bytes=10**9)
    spool.open()
    await spool.append(records[10:20])  # segment 2: a length byte flips in frame 5
    await spool.close()
    spool = Spool(folder, max_bytes=10_000_000, segment_bytes=10**9)
    spool.open()
    await spool.append(records[20:])  # segment 3: intact
    await spool.close()
    first, second, _third = sorted(folder.glob("seg-*.log"))
    ends1, _ = read_frames(first.read_bytes())
    ends2, _ = read_frames(second.read_bytes())
    _flip(first, ends1[1][0] + 30)  # inside frame 3's payload: rot-2 is lost for good
    _flip(second, ends2[3][0] + 2)  # frame 5's length: rot-14 and on lose their framing

    client, _ = await ingest(raw_topic=settings.raw_topic, dlq_topic=settings.dlq_topic, spool_dir=settings.spool_dir)

    async def reported() -> bool:
        ready = await (await client.get("/readyz")).json()
        return "2 damaged spool segment(s)" in ready["checks"]["spool"]["detail"]

    await eventually(reported, 30, "/readyz to report the damaged segments")
    ready = await client.get("/readyz")
    assert ready.status == 200  # still serving: new events are safe
    metrics = await (await client.get("/metrics")).text()
    assert "headwater_ingest_spool_damaged_segments 2.0" in metrics
    assert (
        await client.post("/v1/track", json={"event": "E", "userId": "u", "messageId": "after"}, headers=AUTH)
    ).status == 200
    delivered = {
        decode(r)[0].message_id
        for r in await read_topic(kafka_bootstrap, settings.raw_topic, expected=24, timeout_s=30)
    }
    expected = {f"rot-{i}" for i in range(30)} - {"rot-2", *(f"rot-{i}" for i in range(14, 20))}
    assert delivered == expected | {"after"}
    damaged = sorted((folder / "damaged").glob("seg-*.log"))
    assert [p.name for p in damaged] == [first.name, second.name]

    # The operator inspects, then replays what a resync recovers from the second one.
    cli = [sys.executable, "-m", "services.cli", "spool"]
    env = {
        **os.environ,
        "HEADWATER_INGEST_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HEADWATER_INGEST_DLQ_TOPIC": settings.dlq_topic,
    }
    shown = json.loads(
        subprocess.run([*cli, "inspect", str(damaged[1])], env=env, capture_output=True, check=True).stdout
    )
    assert shown["good_frames"] == 4 and len(shown["damaged_ranges"]) == 1
    assert len(shown["recovered_frames"]) == 5
    replay = await asyncio.to_thread(
        subprocess.run, [*cli, "replay", str(damaged[1])], env=env, capture_output=True, check=True
    )
    assert b"replayed 5 records" in replay.stdout
    delivered = {
        decode(r)[0].message_id
        for r in await read_topic(kafka_bootstrap, settings.raw_topic, expected=29, timeout_s=30)
    }
    assert delivered == expected | {"after"} | {f"rot-{i}" for i in range(15, 20)}

    async def one_left() -> bool:
        ready = await (await client.get("/readyz")).json()
        return "1 damaged spool segment(s)" in ready["checks"]["spool"]["detail"]

    await eventually(one_left, 10, "/readyz to drop the replayed segment")
