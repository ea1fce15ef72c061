"""Errors of the ingest service."""

from __future__ import annotations

from services.common.errors import HeadwaterError


class IngestError(HeadwaterError):
    """Root of the ingest service's errors."""


class SpoolFull(IngestError):
    """Kafka is not taking events and the local spool reached its size limit.

    Clients get 503 with Retry-After; Segment SDKs retry.
    """

    retriable = True


class Overloaded(IngestError):
    """More events are in flight in this process than the configured limit."""

    retriable = True


class SpoolDamaged(IngestError):
    """A spool segment holds frames that fail their CRC before its durable end.

    The segment was set aside (``damaged/`` in the spool folder) after its good
    frames were sent; draining goes on with the next segment after a backoff.
    """

    retriable = True
