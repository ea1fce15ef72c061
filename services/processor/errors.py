"""Errors of the processor."""

from __future__ import annotations

from services.common.errors import HeadwaterError


class ProcessorError(HeadwaterError):
    """Root of the processor's own errors."""


class BadInput(ProcessorError):
    """A record that can never be processed (it becomes a bad row); retrying cannot help."""

    retriable = False


class ConsumerStuck(ProcessorError):
    """The consumer stayed out of its group, or made no progress with records waiting, past
    ``rejoin_timeout_s`` while Kafka answered: the process fails and its supervisor starts it
    again (a new process fences the old producers and reads the committed state back)."""

    retriable = True
