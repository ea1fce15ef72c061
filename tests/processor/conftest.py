"""Helpers for the processor tests: envelopes, a small geo-IP database, a sources file."""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from services.common.proto.envelope_pb2 import Envelope
from services.common.segment import user_key

CHROME_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
)
IPHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"
)
GOOGLEBOT_UA = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"

LONDON_IP = "81.2.69.142"
BERLIN_IP6 = "2a02:8108:1234:5678::1"

SOURCES = {
    "sources": [
        {
            "id": "web",
            "name": "web",
            "write_key": "wk-web",
            "enrichment": {"ip": "anonymize"},
            "destinations": [
                {"name": "warehouse"},
                {"name": "crm", "types": ["identify", "group"]},
                {"name": "billing", "types": ["track"], "events": ["Order Completed"]},
                {"name": "pro", "where": {"properties.plan": "pro"}},
            ],
        },
        {
            "id": "server",
            "name": "server",
            "write_key": "wk-server",
            "enrichment": {"user_agent": False, "bot": False, "geo": False, "campaign": False, "ip": "remove"},
        },
        {"id": "keep", "name": "keep", "write_key": "wk-keep"},
    ]
}

_offsets = itertools.count()


def envelope(
    event: dict[str, Any] | bytes,
    *,
    source_id: str = "web",
    message_id: str | None = None,
    received_at_ms: int | None = None,
    ip: str = LONDON_IP,
    ua: str = CHROME_UA,
    path: str = "/v1/batch",
) -> bytes:
    """An events.raw value the way ingest writes it."""
    if isinstance(event, dict):
        event = dict(event)
        event.setdefault("messageId", message_id or str(uuid.uuid4()))
        message_id = event["messageId"]
        body = orjson.dumps(event)
    else:
        body = event
    return Envelope(
        schema_version=1,
        source_id=source_id,
        message_id=message_id or "",
        received_at_ms=received_at_ms or int(time.time() * 1000),
        client_ip=ip,
        user_agent=ua,
        request_id="req-1",
        path=path,
        event=body,
    ).SerializeToString()


def raw_key(source_id: str, event: dict[str, Any]) -> bytes:
    return f"{source_id}:{user_key(event)}".encode()


def record(
    value: bytes | None,
    *,
    key: bytes | None = b"web:u1",
    partition: int = 0,
    headers: tuple[tuple[str, bytes], ...] = (("hw-schema", b"envelope/1"),),
) -> SimpleNamespace:
    """A stand-in for aiokafka's ConsumerRecord in pure unit tests (no broker involved)."""
    return SimpleNamespace(
        topic="events.raw",
        partition=partition,
        offset=next(_offsets),
        timestamp=int(time.time() * 1000),
        key=key,
        value=value,
        headers=headers,
    )


@pytest.fixture
def sources_file(tmp_path: Path) -> Path:
    path = tmp_path / "sources.json"
    path.write_bytes(orjson.dumps(SOURCES))
    return path


@pytest.fixture(scope="session")
def geoip_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny City database: one London IPv4 network and one Berlin IPv6 network."""
    writer = MMDBWriter(ip_version=6, database_type="GeoIP2-City", ipv4_compatible=True)
    writer.insert_network(
        IPSet(["81.2.69.0/24"]),
        {
            "country": {"iso_code": "GB", "names": {"en": "United Kingdom"}},
            "subdivisions": [{"iso_code": "ENG", "names": {"en": "England"}}],
            "city": {"names": {"en": "London"}},
            "location": {"latitude": 51.5142, "longitude": -0.0931, "time_zone": "Europe/London"},
        },
    )
    writer.insert_network(
        IPSet(["2a02:8108::/32"]),
        {
            "country": {"iso_code": "DE", "names": {"en": "Germany"}},
            "subdivisions": [{"iso_code": "BE", "names": {"en": "Land Berlin"}}],
            "city": {"names": {"en": "Berlin"}},
            "location": {"latitude": 52.52, "longitude": 13.405, "time_zone": "Europe/Berlin"},
        },
    )
    path = tmp_path_factory.mktemp("geo") / "city.mmdb"
    writer.to_db_file(str(path))
    return path
