"""Ingest benchmark: ingest against the real Kafka, beside two baselines.

    .venv/bin/python bench/bench_ingest.py [--duration 10] [--connections 32,128] [--pin]

Drives each HTTP server with wrk (Debian package ``wrk``) on the same machine
and prints requests/s, events/s, p50/p99 latency, CPU seconds per 1,000
events and peak RSS of the server process for:
  - bare:   an aiohttp handler that only parses the same body (bench/bare_server.py)
  - ingest: services.ingest, one worker process, Kafka acks=all, zstd
for single-event /v1/track and /v1/batch with 20 events; then a plain
aiokafka producer sending the same records with the same settings.
With ``--pin`` every server runs pinned to one core (taskset) and wrk to
another, so the ratios compare handlers on equal CPU rather than how the
scheduler shared the machine. Kafka's threads are moved to wrk's core for
the run (and back after): in production the broker never shares ingest's
core, and here it would otherwise be woken onto it by every produce request
and take its time from ingest's. ``--kafka-anywhere`` leaves Kafka unpinned,
as runs before this option measured.
To see where the time goes, sample the ingest process while wrk runs:
``py-spy record -p <pid> -d 10 --format raw -o ingest.raw`` (py-spy from PyPI).
Every figure is taken at each wrk connection count of ``--connections``. A 200
waits for Kafka's ack, so a client's next request waits for it too: with few
connections a Kafka flush carries few requests, and its fixed cost (about half
a millisecond of aiokafka's CPU) is shared by few. The ``req/flush`` column,
read from ingest's own metrics, says how many each flush carried.
Goals: pinned, ingest /v1/track >= 65% of bare req/s and /v1/batch events/s
>= 30% of the bare handler's; batched events/s >= 50% of the plain producer's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer

from bench._proc import cpu_seconds, peak_rss_mb
from services.common.kafka import TopicSpec, ensure_topics
from services.common.proto.envelope_pb2 import Envelope
from services.devstack import stack

KEY = "bench-write-key"
ROOT = Path(__file__).resolve().parent.parent


def _event(i: int) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Product Viewed",
        "userId": f"user-{i}",
        "properties": {"product_id": "p-123", "price": 19.99, "currency": "EUR", "position": i},
        "context": {
            "library": {"name": "analytics.js", "version": "4.1.0"},
            "page": {"url": "https://shop.example/p/123?utm_source=news", "path": "/p/123"},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36",
        },
        "timestamp": "2026-11-24T12:00:00.000Z",
        "sentAt": "2026-11-24T12:00:00.100Z",
    }


BODIES = {
    "track": ("/v1/track", json.dumps(_event(1)), 1),
    "batch20": ("/v1/batch", json.dumps({"batch": [_event(i) for i in range(20)]}), 20),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_http(port: int, path: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
    raise RuntimeError(f"server on {port} did not start")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS[m.group(2)]


# Cores for --pin: the server on one, wrk on the other (set by main()).
PIN: dict[str, list[str]] = {"server": [], "load": []}


def _pinned(role: str, argv: list[str]) -> list[str]:
    return [*PIN[role], *argv]


def _set_affinity(pid: int, cores: str) -> None:
    """Every thread of ``pid`` (a JVM's too) onto ``cores``."""
    subprocess.run(["taskset", "-a", "-p", "-c", cores, str(pid)], check=True, capture_output=True)


def run_wrk(port: int, path: str, body: str, duration: int, connections: int) -> dict[str, float]:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    auth = base64.b64encode(f"{KEY}:".encode()).decode()
    script.write(
        f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
        f'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Basic {auth}"\n'
    )
    script.close()
    out = subprocess.run(
        _pinned(
            "load",
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{duration}s",
                "--latency",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}{path}",
            ],
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # Anchored to the line: "Latency ... 75.50%" in the thread stats also holds "50%".
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps": rps, "p50": p50, "p99": p99, "errors": float(non2xx.group(1)) if non2xx else 0.0}


def _flushes(port: int) -> tuple[float, float]:
    """Ingest's answered requests and Kafka flushes so far, from its /metrics
    (NaN for a server without them: the bare handler)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return float("nan"), float("nan")
    requests = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("headwater_ingest_requests_total{") and 'status="200"' in line
    )
    flushes = re.search(r"^headwater_ingest_kafka_ack_seconds_count (\S+)", text, re.M)
    return requests, float(flushes.group(1)) if flushes else float("nan")


def measure(
    name: str, proc: subprocess.Popen[bytes], port: int, kind: str, duration: int, connections: int
) -> dict[str, Any]:
    path, body, events = BODIES[kind]
    run_wrk(port, path, body, 1, connections)  # warm-up
    cpu0, (requests0, flushes0) = cpu_seconds(proc.pid), _flushes(port)
    result = run_wrk(port, path, body, duration, connections)
    cpu, (requests1, flushes1) = cpu_seconds(proc.pid) - cpu0, _flushes(port)
    total_events = result["rps"] * duration * events
    return {
        "server": name,
        "kind": kind,
        "connections": connections,
        "per_flush": (requests1 - requests0) / (flushes1 - flushes0) if flushes1 > flushes0 else float("nan"),
        **result,
        "eps": result["rps"] * events,
        "cpu_per_1k": cpu / total_events * 1000 if total_events else float("nan"),
        "rss": peak_rss_mb(proc.pid),
    }


async def plain_producer(bootstrap: str, topic: str, n: int) -> dict[str, float]:
    """The same records as ingest writes, sent by a bare aiokafka producer."""
    values = []
    for i in range(1000):
        event = _event(i)
        event["messageId"] = str(uuid.uuid4())
        values.append(
            Envelope(
                schema_version=1,
                source_id="bench",
                message_id=event["messageId"],
                received_at_ms=int(time.time() * 1000),
                client_ip="127.0.0.1",
                user_agent="wrk",
                request_id=uuid.uuid4().hex,
                path="/v1/batch",
                event=json.dumps(event).encode(),
            ).SerializeToString()
        )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        compression_type="zstd",
        linger_ms=5,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        # Same shape as ingest under batch load: groups of 20 awaited together.
        pending: list[Any] = []
        for i in range(n):
            pending.append(await producer.send(topic, values[i % 1000], key=f"bench:user-{i}".encode()))
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await producer.stop()
    return {"eps": n / elapsed, "cpu_per_1k": cpu / n * 1000}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument(
        "--connections",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[32, 128],
        help="wrk connection counts, comma-separated; each gets its own figures",
    )
    parser.add_argument("--producer-events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin", action="store_true", help="run each server on one core and wrk on another (taskset)")
    parser.add_argument(
        "--kafka-anywhere", action="store_true", help="with --pin: leave Kafka free to run on the servers' core"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2 or shutil.which("taskset") is None:
            sys.exit("--pin needs two cores and taskset (util-linux)")
        PIN["server"] = ["taskset", "-c", str(cores[-1])]
        PIN["load"] = ["taskset", "-c", str(cores[0])]

    settings = stack.StackSettings()
    await asyncio.to_thread(stack.up, settings, cassandra=False)
    kafka_pid = stack.kafka_server(settings).pid() if args.pin and not args.kafka_anywhere else None
    if kafka_pid is not None:
        _set_affinity(kafka_pid, PIN["load"][-1])
    run_id = uuid.uuid4().hex[:8]
    raw_topic, dlq_topic = f"bench.events.raw.{run_id}", f"bench.events.dlq.{run_id}"
    await ensure_topics(
        settings.kafka_bootstrap,
        [TopicSpec(raw_topic, 8), TopicSpec(dlq_topic, 1), TopicSpec(f"bench.plain.{run_id}", 8)],
    )
    work = Path(tempfile.mkdtemp(prefix="hw-bench-"))
    (work / "sources.json").write_text(json.dumps({"sources": [{"id": "bench", "name": "bench", "write_key": KEY}]}))
    rows: list[dict[str, Any]] = []
    plains: list[dict[str, float]] = []
    bare_port, ingest_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "HEADWATER_INGEST_HTTP_HOST": "127.0.0.1",
        "HEADWATER_INGEST_HTTP_PORT": str(ingest_port),
        "HEADWATER_INGEST_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "HEADWATER_INGEST_RAW_TOPIC": raw_topic,
        "HEADWATER_INGEST_DLQ_TOPIC": dlq_topic,
        "HEADWATER_INGEST_SOURCES_FILE": str(work / "sources.json"),
        "HEADWATER_INGEST_SPOOL_DIR": str(work / "spool"),
        "HEADWATER_INGEST_LOG_LEVEL": "WARNING",
    }
    bare = subprocess.Popen(_pinned("server", [sys.executable, str(ROOT / "bench" / "bare_server.py"), str(bare_port)]))
    ingest = subprocess.Popen(_pinned("server", [sys.executable, "-m", "services.ingest"]), env=env, cwd=ROOT)
    try:
        await _wait_http(bare_port, "/v1/x")
        await _wait_http(ingest_port, "/healthz")
        # Rounds alternate between the servers so background load hits both alike;
        # the medians are reported.
        for _ in range(args.rounds):
            for connections in args.connections:
                for kind in BODIES:
                    rows.append(measure("bare aiohttp", bare, bare_port, kind, args.duration, connections))
                    rows.append(measure("ingest", ingest, ingest_port, kind, args.duration, connections))
            plains.append(await plain_producer(settings.kafka_bootstrap, f"bench.plain.{run_id}", args.producer_events))
    finally:
        for proc in (bare, ingest):
            proc.terminate()
            proc.wait()
        if kafka_pid is not None:
            _set_affinity(kafka_pid, ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))

    plain = {k: statistics.median([p[k] for p in plains]) for k in ("eps", "cpu_per_1k")}
    pinning = f"servers pinned to core {PIN['server'][-1]}, wrk to core {PIN['load'][-1]}" if args.pin else "not pinned"
    if args.pin:
        pinning += ", Kafka unpinned" if args.kafka_anywhere else f", Kafka moved to core {PIN['load'][-1]}"
    print(
        f"\ningest benchmark ({os.cpu_count()} cores, {pinning}, wrk -t1, "
        f"{args.duration}s a run, median of {args.rounds} alternating rounds; Kafka on the same machine)"
    )
    print(f"{'aiokafka plain producer':<34}{plain['eps']:>11.0f} events/s{plain['cpu_per_1k']:>10.4f} CPU s/1k ev")
    for connections in args.connections:
        report([r for r in rows if r["connections"] == connections], plain, connections, args.pin)
    shutil.rmtree(work, ignore_errors=True)


def report(rows: list[dict[str, Any]], plain: dict[str, float], connections: int, pinned: bool) -> None:
    """The medians and the goal ratios at one connection count."""
    # Each round's own ratio too: the spread says how far to trust the medians.
    per_round = [
        i["rps"] / b["rps"]
        for b, i in zip(
            [r for r in rows if r["server"] == "bare aiohttp" and r["kind"] == "track"],
            [r for r in rows if r["server"] == "ingest" and r["kind"] == "track"],
            strict=True,
        )
    ]
    by = {}
    print(
        f"\nwrk -c{connections}\n{'server':<14}{'body':<9}{'req/s':>10}{'events/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU s/1k ev':>13}{'peak RSS MB':>13}{'non-2xx':>9}{'req/flush':>11}"
    )
    for server in ("bare aiohttp", "ingest"):
        for kind in BODIES:
            mine = [r for r in rows if r["server"] == server and r["kind"] == kind]
            r = {
                k: statistics.median([m[k] for m in mine]) for k in ("rps", "eps", "p50", "p99", "cpu_per_1k", "errors")
            }
            r["rss"], r["per_flush"] = max(m["rss"] for m in mine), statistics.median([m["per_flush"] for m in mine])
            by[(server, kind)] = r
            flush = "" if r["per_flush"] != r["per_flush"] else f"{r['per_flush']:.1f}"  # NaN: no Kafka
            print(
                f"{server:<14}{kind:<9}{r['rps']:>10.0f}{r['eps']:>11.0f}{r['p50']:>9.2f}"
                f"{r['p99']:>9.2f}{r['cpu_per_1k']:>13.4f}{r['rss']:>13.1f}{r['errors']:>9.0f}{flush:>11}"
            )
    track_ratio = by[("ingest", "track")]["rps"] / by[("bare aiohttp", "track")]["rps"]
    batch_ratio = by[("ingest", "batch20")]["eps"] / plain["eps"]
    batch_bare_ratio = by[("ingest", "batch20")]["eps"] / by[("bare aiohttp", "batch20")]["eps"]
    goals = "(pinned goals: 0.65 and 0.30)" if pinned else "(goals are for --pin: 0.65 and 0.30)"
    print(
        f"/v1/track: ingest at {track_ratio:.2f} of the bare handler's req/s; "
        f"/v1/batch: {batch_bare_ratio:.2f} of its events/s {goals}"
    )
    print(f"/v1/track round by round: {', '.join(f'{r:.2f}' for r in per_round)}")
    print(f"/v1/batch: ingest at {batch_ratio:.0%} of the plain producer's events/s (goal >= 50%)")


if __name__ == "__main__":
    asyncio.run(main())
