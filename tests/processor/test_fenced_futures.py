"""A fenced producer's futures, dropped unawaited, are not logged as errors; other
dropped futures still reach the loop's handler."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from aiokafka.errors import InvalidProducerEpoch, ProducerFenced

from services.processor.transactions import quiet_fenced_futures


def _drop_failed_future(loop: asyncio.AbstractEventLoop, exc: BaseException) -> None:
    future = loop.create_future()
    future.set_exception(exc)
    del future  # collected unretrieved: asyncio reports it to the loop's handler


async def test_only_unfenced_dropped_futures_reach_the_handler() -> None:
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        quiet_fenced_futures(loop)
        _drop_failed_future(loop, ProducerFenced())
        _drop_failed_future(loop, ValueError("not a fence"))
        _drop_failed_future(loop, InvalidProducerEpoch())
        gc.collect()
        loop.call_exception_handler({"message": "something else", "exception": ProducerFenced()})
    finally:
        loop.set_exception_handler(before)
    assert [(type(c["exception"]).__name__, c["message"].split()[-1]) for c in seen] == [
        ("ValueError", "retrieved"),
        ("ProducerFenced", "else"),
    ]
