"""Helpers for tests that run the services as separate processes, as in production."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import eventually, free_port, unique_name


def start(service: str, settings: Mapping[str, object], log: Path) -> subprocess.Popen[bytes]:
    """``python -m services.<service>`` with HEADWATER_<SERVICE>_<NAME> variables from ``settings``."""
    prefix = f"HEADWATER_{service.upper()}_"
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env.update({f"{prefix}{k}": str(v) for k, v in settings.items()})
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


async def wait_ready(name: str, proc: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float = 90) -> None:
    """Until the service answers /readyz with 200; fails at once (with its log) if it exits."""
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, timeout_s, f"{name} to be ready")


def stop(procs: list[subprocess.Popen[bytes]], timeout_s: float = 30) -> None:
    """SIGTERM every process still running, then wait; kill what does not stop in time."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settings(
    kafka_bootstrap: str, cassandra_port: int, keyspace: str, sources: Path, tmp_path: Path
) -> tuple[dict[str, dict[str, object]], dict[str, int], dict[str, str]]:
    """Each service's settings on fresh topics, groups and ports; also the ports and topics."""
    topics = {name: unique_name(f"test.e2e.{name}") for name in ("raw", "enriched", "dlq", "late")}
    ports = {name: free_port() for name in ("ingest", "processor", "metrics")}
    common = {"KAFKA_BOOTSTRAP": kafka_bootstrap, "HTTP_HOST": "127.0.0.1"}
    envs: dict[str, dict[str, object]] = {
        "ingest": {
            **common,
            "HTTP_PORT": ports["ingest"],
            "RAW_TOPIC": topics["raw"],
            "DLQ_TOPIC": topics["dlq"],
            "SOURCES_FILE": sources,
            "SPOOL_DIR": tmp_path / "spool",
            "RAW_PARTITIONS": 2,
        },
        "processor": {
            **common,
            "HTTP_PORT": ports["processor"],
            "RAW_TOPIC": topics["raw"],
            "ENRICHED_TOPIC": topics["enriched"],
            "DLQ_TOPIC": topics["dlq"],
            "SOURCES_FILE": sources,
            "GROUP_ID": unique_name("e2e-processor"),
            "DEDUPE_TOPIC": unique_name("test.e2e.dedupe"),
            "DEST_TOPIC_PREFIX": unique_name("test.e2e.dest") + ".",
            "RAW_PARTITIONS": 2,
            "ENRICHED_PARTITIONS": 2,
        },
        "metrics": {
            **common,
            "HTTP_PORT": ports["metrics"],
            "ENRICHED_TOPIC": topics["enriched"],
            "DLQ_TOPIC": topics["dlq"],
            "LATE_TOPIC": topics["late"],
            "CONSUMER_GROUP": unique_name("e2e-metrics"),
            "CASSANDRA_PORT": cassandra_port,
            "CASSANDRA_KEYSPACE": keyspace,
            "SOURCES_FILE": sources,
        },
    }
    return envs, ports, topics


@contextlib.asynccontextmanager
async def running(
    kafka_bootstrap: str, cassandra_port: int, keyspace: str, sources: Path, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    """Ingest, processor and metrics as processes, ready; stopped (SIGTERM) on the way out."""
    envs, ports, topics = settings(kafka_bootstrap, cassandra_port, keyspace, sources, tmp_path)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, values in envs.items():
            procs[name] = start(name, values, tmp_path / f"{name}.log")
        for name, port in ports.items():
            await wait_ready(name, procs[name], port, tmp_path / f"{name}.log")
        yield {"ports": ports, "topics": topics, "procs": procs, "logs": tmp_path, "settings": envs}
    finally:
        stop(list(procs.values()))
