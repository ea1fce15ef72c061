"""The one service lifecycle (services/common/runner.py): start order, reverse
stop, failures, the bounded drain and the exit codes, on a real HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from services.common.components import Component
from services.common.process import EXIT_FAILED, EXIT_OK
from services.common.runner import Service, serve
from tests.helpers import free_port


class Recorder(Component):
    def __init__(self, name: str, events: list[str], *, fail_start: bool = False) -> None:
        super().__init__(name)
        self.events, self.fail_start = events, fail_start

    async def _start(self) -> None:
        if self.fail_start:
            raise RuntimeError(f"{self.name} cannot start")
        self.events.append(f"start {self.name}")

    async def _stop(self) -> None:
        self.events.append(f"stop {self.name}")


def service_with(events: list[str], *names: str, failing: str | None = None) -> Service:
    service = Service("test", web.Application())
    for name in names:
        service.add(Recorder(name, events, fail_start=name == failing))
    return service


async def test_components_start_in_order_and_stop_in_reverse_once() -> None:
    events: list[str] = []
    service = service_with(events, "a", "b", "c")
    await service.start()
    await service.stop()
    await service.stop()
    assert events == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


async def test_a_component_that_cannot_start_stops_those_already_started() -> None:
    events: list[str] = []
    service = service_with(events, "a", "b", "c", failing="c")
    with pytest.raises(RuntimeError, match="c cannot start"):
        await service.start()
    assert events == ["start a", "start b", "stop b", "stop a"]


async def test_a_component_works_as_async_with_and_stop_before_start_is_harmless() -> None:
    events: list[str] = []
    lone = Recorder("x", events)
    await lone.stop()
    async with lone as entered:
        assert entered is lone
        assert lone.started
    assert events == ["start x", "stop x"]


async def test_a_resource_yields_its_value_while_it_runs() -> None:
    @contextlib.asynccontextmanager
    async def client() -> AsyncIterator[str]:
        yield "connected"

    service = Service("test", web.Application())
    resource = service.resource("client", client)
    with pytest.raises(RuntimeError, match="not running"):
        _ = resource.value
    async with resource:
        assert resource.value == "connected"


async def _get(port: int, path: str = "/") -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as answer:
        return answer.status


async def _until_answering(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            await _get(port)
        except aiohttp.ClientConnectionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            return


async def test_sigterm_drains_the_request_in_flight_then_stops_components_and_exits_0() -> None:
    events: list[str] = []
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await release.wait()
        events.append("request answered")
        return web.Response(text="done")

    async def up(_: web.Request) -> web.Response:
        return web.Response(text="up")

    app = web.Application()
    app.router.add_get("/", up)
    app.router.add_get("/slow", slow)
    service = Service("test", app)
    service.add(Recorder("store", events))
    port = free_port()
    served = asyncio.create_task(serve(service, host="127.0.0.1", port=port, drain_timeout_s=5))
    await _until_answering(port)
    in_flight = asyncio.create_task(_get(port, "/slow"))
    await asyncio.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.2)
    assert events == ["start store"], "components must outlive the requests still being answered"
    release.set()
    assert await in_flight == 200
    assert await asyncio.wait_for(served, 10) == EXIT_OK
    assert events == ["start store", "request answered", "stop store"]


async def test_a_loop_that_fails_stops_the_service_with_exit_1() -> None:
    events: list[str] = []

    async def work() -> None:
        await asyncio.sleep(0.2)
        raise ValueError("a bug")

    service = service_with(events, "store")
    service.loop("worker", work, lambda: None, drain_timeout_s=1)
    code = await asyncio.wait_for(serve(service, host="127.0.0.1", port=free_port(), drain_timeout_s=2), 10)
    assert code == EXIT_FAILED
    assert service.failure == "worker failed"
    assert events == ["start store", "stop store"]


async def test_a_loop_that_will_not_drain_is_cancelled_after_its_timeout() -> None:
    cancelled = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    service = Service("test", web.Application())
    service.loop("stubborn", stubborn, lambda: None, drain_timeout_s=0.3)
    served = asyncio.create_task(serve(service, host="127.0.0.1", port=free_port(), drain_timeout_s=5))
    await asyncio.sleep(0.3)
    service.request_stop()
    started = time.monotonic()
    assert await asyncio.wait_for(served, 10) == EXIT_OK
    assert cancelled.is_set()
    assert time.monotonic() - started < 3


async def test_a_component_asks_for_a_failure_stop_instead_of_signalling_its_process() -> None:
    service = Service("test", web.Application())

    async def fail_soon() -> None:
        await asyncio.sleep(0.2)
        service.fail("Cassandra refused the schema")

    service.hooks("checker", fail_soon)
    assert await asyncio.wait_for(serve(service, host="127.0.0.1", port=free_port()), 10) == EXIT_FAILED
    assert service.failure == "Cassandra refused the schema"


async def test_a_start_failure_exits_1_without_opening_the_port() -> None:
    events: list[str] = []
    service = service_with(events, "a", "b", failing="b")
    port = free_port()
    assert await serve(service, host="127.0.0.1", port=port) == EXIT_FAILED
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(port)
    assert events == ["start a", "stop a"]
