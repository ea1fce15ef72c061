"""The processor as a service, without a broker: HTTP endpoints, readiness, SIGTERM, bad settings."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from services.processor.settings import Settings
from tests.processor.kafka_helpers import REPO, free_port, settings_env, start_subprocess


async def test_waits_for_kafka_not_ready_then_stops_on_sigterm(sources_file: Path, tmp_path: Path) -> None:
    port = free_port()
    # Nothing listens on this port: Kafka is "down".
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}", sources_file=sources_file, http_port=port, retry_backoff_s=0.2
    )
    proc = start_subprocess(settings, tmp_path / "p.log")
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        ready: dict[str, object] | None = None
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline and ready is None:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        assert resp.status == 200
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        assert resp.status == 503
                        ready = await resp.json()
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
        assert ready is not None, "the processor never answered on HTTP"
        checks = ready["checks"]
        assert isinstance(checks, dict)
        assert checks["kafka"]["ok"] is False and checks["consumer"]["ok"] is False
        assert checks["sources"]["ok"] is True
        assert proc.poll() is None, "the processor must wait for Kafka, not exit"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0


def test_bad_setting_is_named_and_exits_2(sources_file: Path) -> None:
    env = settings_env(Settings(sources_file=sources_file))
    env["HEADWATER_PROCESSOR_BATCH_MAX_RECORDS"] = "zero"
    done = subprocess.run(
        [sys.executable, "-m", "services.processor"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "HEADWATER_PROCESSOR_BATCH_MAX_RECORDS" in done.stderr
