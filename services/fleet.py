"""``headwater run``: the local fleet (ingest, processor, metrics) as child
processes on the running dev stack, optionally with demo traffic.

When a source in config/sources.json runs beside the legacy Kinesis path
(its ``legacy``), the fleet also starts the dev stack's Kinesis server, makes
the named streams there if they are missing, and runs the bridge and/or the
mirror (services/bridge) for the directions asked for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from services.demo import run_demo
from services.devstack import prometheus, stack


@dataclass(frozen=True)
class Member:
    name: str
    module: str
    port: int
    env: dict[str, str]
    args: tuple[str, ...] = ()


# The local Kinesis server takes any credentials; real ones in the environment win.
LOCAL_AWS = {"AWS_ACCESS_KEY_ID": "headwater-local", "AWS_SECRET_ACCESS_KEY": "headwater-local"}


def legacy_directions(root: Path) -> dict[str, set[str]]:
    """Stream -> the directions sources ask for ("bridge", "mirror"); empty when none."""
    from services.common.sources import parse_sources

    out: dict[str, set[str]] = {}
    for source in parse_sources((root / "config" / "sources.json").read_bytes()).sources:
        for entry in source.legacy:
            out.setdefault(entry.stream, set()).add(entry.direction)
    return out


def legacy_members(settings: stack.StackSettings, root: Path, directions: dict[str, set[str]]) -> list[Member]:
    wanted = set().union(*directions.values()) if directions else set()
    aws = {k: v for k, v in LOCAL_AWS.items() if k not in os.environ}
    common = {
        "HEADWATER_BRIDGE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "HEADWATER_BRIDGE_HTTP_HOST": "127.0.0.1",
        "HEADWATER_BRIDGE_SOURCES_FILE": str(root / "config" / "sources.json"),
        "HEADWATER_BRIDGE_CASSANDRA_PORT": str(settings.cassandra_port),
        "HEADWATER_BRIDGE_AWS_ENDPOINT_URL": settings.kinesis_endpoint,
        **aws,
    }
    members = []
    if "bridge" in wanted:
        members.append(
            Member("bridge", "services.bridge", 8084, {**common, "HEADWATER_BRIDGE_HTTP_PORT": "8084"}, ("bridge",))
        )
    if "mirror" in wanted:
        members.append(
            Member(
                "mirror", "services.bridge", 8085, {**common, "HEADWATER_BRIDGE_MIRROR_HTTP_PORT": "8085"}, ("mirror",)
            )
        )
    return members


async def ensure_local_streams(settings: stack.StackSettings, streams: list[str], shards: int = 2) -> None:
    """Make the legacy streams on the local Kinesis server (a stand-in for AWS's)."""
    from services.bridge.kinesis import kinesis_client
    from services.bridge.settings import Settings as BridgeSettings

    for name, value in LOCAL_AWS.items():
        os.environ.setdefault(name, value)
    async with kinesis_client(BridgeSettings(aws_endpoint_url=settings.kinesis_endpoint)) as client:
        existing = set((await client.list_streams())["StreamNames"])
        for stream in streams:
            if stream not in existing:
                await client.create_stream(StreamName=stream, ShardCount=shards)
                print(f"created the local Kinesis stream {stream} ({shards} shards)")


def fleet(settings: stack.StackSettings, root: Path) -> list[Member]:
    kafka = settings.kafka_bootstrap
    sources = str(root / "config" / "sources.json")
    return [
        Member(
            "ingest",
            "services.ingest",
            8080,
            {
                "HEADWATER_INGEST_KAFKA_BOOTSTRAP": kafka,
                "HEADWATER_INGEST_HTTP_PORT": "8080",
                "HEADWATER_INGEST_HTTP_HOST": "127.0.0.1",
                "HEADWATER_INGEST_SOURCES_FILE": sources,
                "HEADWATER_INGEST_SPOOL_DIR": str(root / "var" / "spool" / "ingest"),
            },
        ),
        Member(
            "processor",
            "services.processor",
            8081,
            {
                "HEADWATER_PROCESSOR_KAFKA_BOOTSTRAP": kafka,
                "HEADWATER_PROCESSOR_HTTP_PORT": "8081",
                "HEADWATER_PROCESSOR_HTTP_HOST": "127.0.0.1",
                "HEADWATER_PROCESSOR_SOURCES_FILE": sources,
            },
        ),
        Member(
            "metrics",
            "services.metrics",
            8083,
            {
                "HEADWATER_METRICS_KAFKA_BOOTSTRAP": kafka,
                "HEADWATER_METRICS_HTTP_PORT": "8083",
                "HEADWATER_METRICS_HTTP_HOST": "127.0.0.1",
                "HEADWATER_METRICS_SOURCES_FILE": sources,
                "HEADWATER_METRICS_CASSANDRA_PORT": str(settings.cassandra_port),
            },
        ),
    ]


async def _wait_ready(member: Member, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{member.name} exited with {proc.returncode}; see its log")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{member.port}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{member.name} was not ready within {timeout_s:.0f}s")


TARGETS_NAME = "headwater-run"  # the fleet's file-SD file in the local Prometheus's targets folder


def _announce_to_prometheus(settings: stack.StackSettings, members: list[Member]) -> str:
    """Write the fleet's scrape targets for the local Prometheus (one job per service, as in
    compose/) and say where Prometheus answers, or how to start it."""
    jobs: dict[str, list[str]] = {}
    for member in members:
        jobs.setdefault(member.name, []).append(f"127.0.0.1:{member.port}")
    prometheus.write_targets(settings, TARGETS_NAME, jobs)
    url = prometheus.prometheus_url(settings)
    if prometheus.prometheus_server(settings).pid() is None or not prometheus.prometheus_answers(settings):
        return (
            "Prometheus:    not running; `headwater stack up --prometheus` starts it, and it scrapes this "
            "fleet (each service also serves /metrics)"
        )
    return f"Prometheus:    {url} scrapes this fleet; alerts at {url}/alerts, rules in compose/prometheus/rules"


async def _summary() -> str:
    query = {
        "start_relative": {"value": 1, "unit": "hours"},
        "metrics": [
            {
                "name": "headwater.events.count",
                "group_by": [{"name": "tag", "tags": ["type"]}],
                "aggregators": [{"name": "sum", "sampling": {"value": 1, "unit": "hours"}}],
            }
        ],
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post("http://127.0.0.1:8083/api/v1/datapoints/query", json=query) as resp,
    ):
        body = await resp.json()
    lines = []
    for result in body.get("queries", [{}])[0].get("results", []):
        total = sum(v for _, v in result.get("values", []))
        kind = (result.get("tags", {}).get("type") or ["?"])[0]
        lines.append(f"  {kind:<10} {total:.0f} events")
    return "\n".join(lines) or "  (no rollups yet)"


async def run_fleet(root: Path, *, demo: bool, duration_s: float | None) -> int:  # long: the fleet's steps in order
    settings = stack.StackSettings()
    directions = legacy_directions(root)
    await asyncio.to_thread(lambda: stack.up(settings, kinesis=bool(directions)))
    if directions:
        await ensure_local_streams(settings, sorted(directions))
    logs = root / "var" / "log"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[Member, subprocess.Popen[bytes]]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for member in [*fleet(settings, root), *legacy_members(settings, root, directions)]:
            with (logs / f"{member.name}.log").open("ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", member.module, *member.args],
                    cwd=root,
                    env={**os.environ, **member.env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            procs.append((member, proc))
        for member, proc in procs:
            await _wait_ready(member, proc)
            print(f"{member.name:<10} ready on http://127.0.0.1:{member.port}  (log: var/log/{member.name}.log)")
        prometheus_line = await asyncio.to_thread(_announce_to_prometheus, settings, [m for m, _ in procs])
        print(
            "\nSend events:   curl -u demo-server-write-key: -H 'Content-Type: application/json' "
            '-d \'{"userId":"u1","event":"Hello"}\' http://127.0.0.1:8080/v1/track'
        )
        print("Query series:  POST http://127.0.0.1:8083/api/v1/datapoints/query (KairosDB API)")
        print(f"{prometheus_line}\nStop:          Ctrl-C\n")
        demo_task = asyncio.create_task(run_demo("http://127.0.0.1:8080")) if demo else None
        deadline = None if duration_s is None else loop.time() + duration_s
        while not stop.is_set() and (deadline is None or loop.time() < deadline):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 10)
            if demo_task is not None and demo_task.done():
                demo_task.result()  # a failed demo is shown, not hidden
            for member, proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{member.name} exited with {proc.returncode}; see var/log/{member.name}.log")
            with contextlib.suppress(aiohttp.ClientError, orjson.JSONDecodeError, KeyError, IndexError):
                print("rollups, last hour:\n" + await _summary())
        if demo_task is not None:
            demo_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await demo_task
    finally:
        prometheus.remove_targets(settings, TARGETS_NAME)
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for member, proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"{member.name} did not drain in 30s; killing it", file=sys.stderr)
                proc.kill()
    return 0
