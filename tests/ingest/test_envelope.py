"""The hand-written Envelope encoder against protobuf's own (no servers)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.common.proto.envelope_pb2 import Envelope
from services.ingest.envelope import EnvelopeWriter

texts = st.text(max_size=300)


@given(
    source_id=texts,
    message_id=texts,
    received_at_ms=st.integers(-(2**63), 2**63 - 1),
    client_ip=texts,
    user_agent=texts,
    request_id=texts,
    path=texts,
    schema_version=st.integers(0, 2**32 - 1),
    event=st.binary(max_size=40_000),
)
def test_bytes_are_what_protobuf_writes(
    source_id: str,
    message_id: str,
    received_at_ms: int,
    client_ip: str,
    user_agent: str,
    request_id: str,
    path: str,
    schema_version: int,
    event: bytes,
) -> None:
    fields: dict[str, Any] = {
        "source_id": source_id,
        "received_at_ms": received_at_ms,
        "client_ip": client_ip,
        "user_agent": user_agent,
        "request_id": request_id,
        "path": path,
        "schema_version": schema_version,
    }
    ours = EnvelopeWriter(**fields).encode(message_id, event)
    assert ours == Envelope(**fields, message_id=message_id, event=event).SerializeToString()
    assert Envelope.FromString(ours) == Envelope(**fields, message_id=message_id, event=event)


def test_one_writer_serves_every_event_of_a_request() -> None:
    writer = EnvelopeWriter(
        source_id="web",
        received_at_ms=1_764_000_000_123,
        client_ip="203.0.113.9",
        user_agent="analytics.js",
        request_id="r-1",
        path="/v1/batch",
    )
    first, second = (
        Envelope.FromString(writer.encode("m-1", b'{"a":1}')),
        Envelope.FromString(writer.encode("m-2", b'{"b":2}')),
    )
    assert (first.message_id, first.event, second.message_id, second.event) == ("m-1", b'{"a":1}', "m-2", b'{"b":2}')
    assert first.source_id == second.source_id == "web"
    assert first.received_at_ms == 1_764_000_000_123 and first.schema_version == 1


def test_lengths_at_every_varint_width_boundary() -> None:
    """The one-, two- and three-byte length prefixes, each side of their bounds."""
    writer = EnvelopeWriter(
        source_id="web", received_at_ms=1, client_ip="", user_agent="", request_id="", path="/v1/track"
    )
    for size in (1, 127, 128, 129, 16_383, 16_384, 16_385, 2**21 - 1, 2**21):
        event = b"x" * size
        expected = Envelope(
            schema_version=1,
            source_id="web",
            received_at_ms=1,
            path="/v1/track",
            message_id="m" * (size % 300),
            event=event,
        ).SerializeToString()
        assert writer.encode("m" * (size % 300), event) == expected, size
