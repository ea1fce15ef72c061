"""Bad rows: the typed records every service writes to the dead-letter topic.

A bad row is JSON (see proto/README.md, topic ``events.dlq``). It says what
failed (``failure_type``, one of FailureType), why (``errors``), where the
input came from, and carries the original bytes (base64) so nothing is lost
and the row can be replayed once the cause is fixed.
"""

from __future__ import annotations

import base64
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

BAD_ROW_SCHEMA = "headwater/bad_row/1"


class FailureType(enum.StrEnum):
    """Why an input could not be accepted. New members may be added; none is ever renamed."""

    SCHEMA_VIOLATION = "schema_violation"  # JSON parsed but breaks the Segment spec
    INVALID_JSON = "invalid_json"  # bytes are not a JSON object
    SIZE_VIOLATION = "size_violation"  # over a configured size limit
    ENVELOPE_DECODE = "envelope_decode"  # events.raw value is not an Envelope
    PIXEL_DECODE = "pixel_decode"  # a tracking pixel's data= could not be read
    POISON = "poison"  # processing failed repeatedly (a bug or a bad edge case)
    LATE_EVENT = "late_event"  # outside the allowed lateness for rollups


@dataclass(frozen=True)
class BadRow:
    failure_type: FailureType
    errors: Sequence[str]
    original: bytes
    service: str
    version: str
    source_id: str | None = None
    message_id: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    request_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "schema": BAD_ROW_SCHEMA,
                "failure_type": self.failure_type.value,
                "errors": list(self.errors),
                "source_id": self.source_id,
                "message_id": self.message_id,
                "producer": {"service": self.service, "version": self.version},
                "input": {
                    "topic": self.topic,
                    "partition": self.partition,
                    "offset": self.offset,
                    "request_id": self.request_id,
                },
                "failed_at_ms": int(time.time() * 1000),
                "original_base64": base64.b64encode(self.original).decode(),
                "extra": self.extra,
            }
        )

    @staticmethod
    def decode(raw: bytes) -> dict[str, Any]:
        """Parse a bad row back (for tests and replay tools); original is decoded."""
        row: dict[str, Any] = orjson.loads(raw)
        row["original"] = base64.b64decode(row.pop("original_base64"))
        return row
