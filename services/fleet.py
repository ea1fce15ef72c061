"""``headwater run``: the local fleet (ingest, processor, metrics) as child
processes on the running dev stack, optionally with demo traffic."""

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
from services.devstack import stack


@dataclass(frozen=True)
class Member:
    name: str
    module: str
    port: int
    env: dict[str, str]


def fleet(settings: stack.StackSettings, root: Path) -> list[Member]:
    kafka = settings.kafka_bootstrap
    sources = str(root / "config" / "sources.json")
    return [
        Member("ingest", "services.ingest", 8080, {
            "HEADWATER_INGEST_KAFKA_BOOTSTRAP": kafka, "HEADWATER_INGEST_HTTP_PORT": "8080",
            "HEADWATER_INGEST_HTTP_HOST": "127.0.0.1", "HEADWATER_INGEST_SOURCES_FILE": sources,
            "HEADWATER_INGEST_SPOOL_DIR": str(root / "var" / "spool" / "ingest")}),
        Member("processor", "services.processor", 8081, {
            "HEADWATER_PROCESSOR_KAFKA_BOOTSTRAP": kafka, "HEADWATER_PROCESSOR_HTTP_PORT": "8081",
            "HEADWATER_PROCESSOR_HTTP_HOST": "127.0.0.1", "HEADWATER_PROCESSOR_SOURCES_FILE": sources}),
        Member("metrics", "services.metrics", 8083, {
            "HEADWATER_METRICS_KAFKA_BOOTSTRAP": kafka, "HEADWATER_METRICS_HTTP_PORT": "8083",
            "HEADWATER_METRICS_HTTP_HOST": "127.0.0.1", "HEADWATER_METRICS_SOURCES_FILE": sources,
            "HEADWATER_METRICS_CASSANDRA_PORT": str(settings.cassandra_port)}),
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


async def _summary() -> str:
    query = {"start_relative": {"value": 1, "unit": "hours"},
             "metrics": [{"name": "headwater.events.count", "group_by": [{"name": "tag", "tags": ["type"]}],
                          "aggregators": [{"name": "sum", "sampling": {"value": 1, "unit": "hours"}}]}]}
    async with aiohttp.ClientSession() as http, http.post(
            "http://127.0.0.1:8083/api/v1/datapoints/query", json=query) as resp:
        body = await resp.json()
    lines = []
    for result in body.get("queries", [{}])[0].get("results", []):
        total = sum(v for _, v in result.get("values", []))
        kind = (result.get("tags", {}).get("type") or ["?"])[0]
        lines.append(f"  {kind:<10} {total:.0f} events")
    return "\n".join(lines) or "  (no rollups yet)"


async def run_fleet(root: Path, *, demo: bool, duration_s: float | None) -> int:
    settings = stack.StackSettings()
    await asyncio.to_thread(stack.up, settings)
    logs = root / "var" / "log"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[Member, subprocess.Popen[bytes]]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for member in fleet(settings, root):
            with (logs / f"{member.name}.log").open("ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", member.module], cwd=root,
                                        env={**os.environ, **member.env}, stdout=log, stderr=subprocess.STDOUT)
            procs.append((member, proc))
        for member, proc in procs:
            await _wait_ready(member, proc)
            print(f"{member.name:<10} ready on http://127.0.0.1:{member.port}  (log: var/log/{member.name}.log)")
        print("\nSend events:   curl -u demo-server-write-key: -H 'Content-Type: application/json' "
              "-d '{\"userId\":\"u1\",\"event\":\"Hello\"}' http://127.0.0.1:8080/v1/track")
        print("Query series:  POST http://127.0.0.1:8083/api/v1/datapoints/query (KairosDB API)")
        print("Prometheus:    http://127.0.0.1:{8080,8081,8083}/metrics   Stop: Ctrl-C\n")
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
