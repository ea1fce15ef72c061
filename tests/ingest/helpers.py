"""Helpers for tests that run ingest as its own process (``python -m services.ingest``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import free_port, unique_name


@dataclass
class LiveIngest:
    """One ingest process on a loopback port, its own topics, its log in a file."""

    folder: Path
    kafka_bootstrap: str
    sources: dict[str, Any]
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    raw_topic: str = field(default_factory=lambda: unique_name("test.events.raw"))
    dlq_topic: str = field(default_factory=lambda: unique_name("test.events.dlq"))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "ingest.log"

    @property
    def sources_file(self) -> Path:
        return self.folder / "sources.json"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HEADWATER_INGEST_HTTP_HOST": "127.0.0.1",
            "HEADWATER_INGEST_HTTP_PORT": str(self.port),
            "HEADWATER_INGEST_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "HEADWATER_INGEST_RAW_TOPIC": self.raw_topic,
            "HEADWATER_INGEST_DLQ_TOPIC": self.dlq_topic,
            "HEADWATER_INGEST_RAW_PARTITIONS": "2",
            "HEADWATER_INGEST_DLQ_PARTITIONS": "1",
            "HEADWATER_INGEST_SPOOL_DIR": str(self.folder / "spool"),
            "HEADWATER_INGEST_SOURCES_FILE": str(self.sources_file),
            **self.extra_env,
        }

    def start(self, timeout_s: float = 30) -> LiveIngest:
        """Start and wait (polling /healthz) until it answers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.sources_file.exists():
            self.sources_file.write_text(json.dumps(self.sources))
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.ingest"], env=self.env(), stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ingest exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.proc.kill()  # never leave a half-started process behind
        self.proc.wait()
        raise AssertionError(f"ingest did not start: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout_s: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """One blocking request; (status, headers, body) for any status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()
