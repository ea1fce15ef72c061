"""Errors of the processor."""

from __future__ import annotations

from services.common.errors import HeadwaterError


class ProcessorError(HeadwaterError):
    """Root of the processor's own errors."""


class PartitionLost(ProcessorError):
    """Another process took the partition over (our producer was fenced)."""
