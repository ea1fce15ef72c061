"""The backoff helper: what it tries again, what it raises at once, and its deadline."""

from __future__ import annotations

import pytest
from cassandra import InvalidRequest, OperationTimedOut

from services.metrics.retry import SCHEMA_RETRIABLE, retry


class Flaky:
    """Fails with ``errors`` in turn, then answers 7; counts its calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return 7


async def test_a_schema_change_outlasts_timeouts() -> None:
    call = Flaky(OperationTimedOut("heartbeat"), OperationTimedOut("schema agreement"))
    assert await retry(call, what="schema", deadline_s=10, retriable=SCHEMA_RETRIABLE) == 7
    assert call.calls == 3


async def test_an_invalid_statement_is_not_tried_again() -> None:
    call = Flaky(InvalidRequest("no such table"))
    with pytest.raises(InvalidRequest):
        await retry(call, what="schema", deadline_s=10, retriable=SCHEMA_RETRIABLE)
    assert call.calls == 1


async def test_past_the_deadline_the_last_failure_is_raised() -> None:
    call = Flaky(*(OperationTimedOut(f"try {i}") for i in range(100)))
    with pytest.raises(OperationTimedOut):
        await retry(call, what="schema", deadline_s=0.5, retriable=SCHEMA_RETRIABLE)
    assert 2 <= call.calls < 10
