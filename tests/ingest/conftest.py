"""Ingest fixtures: the real app on a real port, writing to unique topics."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.common.proto.envelope_pb2 import Envelope
from services.ingest.app import create_app
from services.ingest.settings import Settings
from tests.ingest.helpers import LiveIngest

WEB_KEY = "web-key"
SERVER_KEY = "server-key"
DISABLED_KEY = "disabled-key"
LIMITED_KEY = "limited-key"

SOURCES: dict[str, Any] = {
    "sources": [
        {"id": "web", "name": "Web", "write_key": WEB_KEY, "allowed_origins": ["https://shop.example"]},
        {"id": "server", "name": "Server", "write_key": SERVER_KEY},
        {"id": "off", "name": "Disabled", "write_key": DISABLED_KEY, "enabled": False},
        {"id": "limited", "name": "Limited", "write_key": LIMITED_KEY, "rate_limit_per_s": 1, "rate_limit_burst": 3},
    ]
}


def basic(key: str, colon: bool = True) -> str:
    raw = f"{key}:" if colon else key
    return "Basic " + base64.b64encode(raw.encode()).decode()


def decode(record: Any) -> tuple[Envelope, dict[str, Any]]:
    env = Envelope()
    env.ParseFromString(record.value)
    return env, json.loads(env.event)


@pytest.fixture
def sources_file(tmp_path: Path) -> Path:
    path = tmp_path / "sources.json"
    path.write_text(json.dumps(SOURCES))
    return path


@pytest.fixture
def ingest_settings(kafka_bootstrap: str, sources_file: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        from tests.helpers import unique_name

        values: dict[str, Any] = {
            "kafka_bootstrap": kafka_bootstrap,
            "sources_file": sources_file,
            "raw_topic": unique_name("test.events.raw"),
            "dlq_topic": unique_name("test.events.dlq"),
            "raw_partitions": 2,
            "dlq_partitions": 1,
            "spool_dir": tmp_path / "spool",
            "kafka_ack_timeout_s": 3.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="module")
def live_ingest(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveIngest]:
    """ingest as its own process on a loopback port, shared by a module's tests
    (for blocking clients: hypothesis, schemathesis, raw sockets)."""
    live = LiveIngest(tmp_path_factory.mktemp("live-ingest"), kafka_bootstrap, SOURCES).start()
    yield live
    assert live.stop() == 0, live.log_path.read_text()[-3000:]


IngestClient = Callable[..., Awaitable[tuple[TestClient[Any, Any], Settings]]]


@pytest.fixture
async def ingest(ingest_settings: Callable[..., Settings]) -> AsyncIterator[IngestClient]:
    """Factory: ``client, settings = await ingest(**overrides)`` serves the app on a real port."""
    clients: list[TestClient[Any, Any]] = []

    async def start(**overrides: Any) -> tuple[TestClient[Any, Any], Settings]:
        settings = ingest_settings(**overrides)
        server = TestServer(create_app(settings))
        # As in production (services/ingest/__main__.py): ingest decodes bodies itself.
        await server.start_server(auto_decompress=False)
        client = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client, settings

    yield start
    for client in clients:
        await client.close()
