"""Errors of the processor."""

from __future__ import annotations

from services.common.errors import HeadwaterError


class ProcessorError(HeadwaterError):
    """Root of the processor's own errors."""


class BadInput(ProcessorError):
    """A record that can never be processed (it becomes a bad row); retrying cannot help."""

    retriable = False
