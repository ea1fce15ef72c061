"""Writes events.raw Envelopes (proto/headwater/v1/envelope.proto) without
building a protobuf message per event.

Every event of one request shares seven of the Envelope's nine fields, so
they are encoded once per request and each event adds only its messageId
and JSON bytes. The output is byte for byte what ``Envelope(...)
.SerializeToString()`` gives (fields in number order, proto3 defaults left
out); tests/ingest/test_envelope.py holds the two together. Readers decode
with the generated class as before.
"""

from __future__ import annotations

import functools

_VARINT = 0
_LEN = 2
_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if 0 < value < 0x4000:  # an event's length mostly: two bytes, without the loop
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    value &= 0xFFFF_FFFF_FFFF_FFFF  # negative int64s take ten bytes, as in protobuf
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value) if value else b""


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(value)) + value if value else b""


def _str(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


_MESSAGE_ID_KEY = _key(3, _LEN)
_REQUEST_ID_KEY = _key(7, _LEN)
_EVENT_KEY = _key(9, _LEN)


@functools.lru_cache(maxsize=4096)
def _shared(
    schema_version: int, source_id: str, client_ip: str, user_agent: str, path: str
) -> tuple[bytes, bytes, bytes]:
    """Fields 1-2, 5-6 and 8: sources, client addresses, user agents and paths
    repeat from request to request."""
    return (_int(1, schema_version) + _str(2, source_id), _str(5, client_ip) + _str(6, user_agent), _str(8, path))


@functools.lru_cache(maxsize=64)
def _received_at(ms: int) -> bytes:
    return _int(4, ms)  # under load many requests share a millisecond


class EnvelopeWriter:
    """The Envelopes of one request's events."""

    __slots__ = ("_head", "_middle")

    def __init__(
        self,
        *,
        source_id: str,
        received_at_ms: int,
        client_ip: str,
        user_agent: str,
        request_id: str,
        path: str,
        schema_version: int = 1,
    ) -> None:
        head, peer, tail = _shared(schema_version, source_id, client_ip, user_agent, path)
        rid = request_id.encode("utf-8")
        self._head = head
        self._middle = b"".join(
            (_received_at(received_at_ms), peer, _REQUEST_ID_KEY + _varint(len(rid)) + rid if rid else b"", tail)
        )

    def encode(self, message_id: str, event: bytes) -> bytes:
        mid = message_id.encode("utf-8")
        return b"".join(
            (self._head, _MESSAGE_ID_KEY, _varint(len(mid)), mid, self._middle, _EVENT_KEY, _varint(len(event)), event)
            if mid and event
            else (self._head, _str(3, message_id), self._middle, _bytes(9, event))
        )
