"""The parts of a service (services/common/runner.py runs them): a
:class:`Component` has ``start()``/``stop()``, safe twice and in any order,
and works as ``async with``.

- :class:`Hooks`: two coroutine functions (a client's connect and close, a one-off
  step such as a schema migration);
- :class:`Resource`: an async context manager, its value available while it runs;
- :class:`Loop`: a long-running task, asked to finish and cancelled past its drain
  timeout; an end of its own tells the service;
- :class:`Site`: a second HTTP site on a port of its own (a worker's own metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

T = TypeVar("T")
C = TypeVar("C", bound="Component")


class Component:
    """A long-lived part of a service. Subclasses override ``_start``/``_stop``;
    ``start``/``stop`` make them safe to call twice and in any order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    async def start(self) -> None:
        if not self.started:
            await self._start()
            self.started = True

    async def stop(self) -> None:
        if self.started:
            self.started = False
            await self._stop()

    async def _start(self) -> None:
        pass

    async def _stop(self) -> None:
        pass

    async def __aenter__(self: C) -> C:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class Hooks(Component):
    """A component made of two coroutine functions (either may be left out):
    a client's ``connect``/``close``, a one-off step such as a schema migration."""

    def __init__(
        self,
        name: str,
        start: Callable[[], Awaitable[Any]] | None = None,
        stop: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        super().__init__(name)
        self._on_start, self._on_stop = start, stop

    async def _start(self) -> None:
        if self._on_start is not None:
            await self._on_start()

    async def _stop(self) -> None:
        if self._on_stop is not None:
            await self._on_stop()


class Resource(Component, Generic[T]):
    """An async context manager as a component: entered by ``start``, left by
    ``stop``; what it yields is ``value`` while it runs."""

    def __init__(self, name: str, factory: Callable[[], AbstractAsyncContextManager[T]]) -> None:
        super().__init__(name)
        self._factory = factory
        self._cm: AbstractAsyncContextManager[T] | None = None
        self._value: T | None = None

    @property
    def value(self) -> T:
        if self._value is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._value

    async def _start(self) -> None:
        cm = self._factory()
        self._value = await cm.__aenter__()
        self._cm = cm

    async def _stop(self) -> None:
        cm, self._cm, self._value = self._cm, None, None
        if cm is not None:
            await cm.__aexit__(None, None, None)


class Loop(Component):
    """``work()`` as a task from ``start`` until ``stop``.

    ``stop`` calls ``ask_stop`` (the work finishes its batch and returns) and
    waits up to ``drain_timeout_s`` before it cancels the task. Work that ends
    on its own tells ``on_end`` (the service: a failure when it raised, a stop
    when it returned)."""

    def __init__(
        self,
        name: str,
        work: Callable[[], Awaitable[None]],
        ask_stop: Callable[[], None],
        *,
        drain_timeout_s: float,
        on_end: Callable[[str, BaseException | None], None] | None = None,
    ) -> None:
        super().__init__(name)
        self._work, self._ask_stop, self._on_end = work, ask_stop, on_end
        self.drain_timeout_s = drain_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _start(self) -> None:
        self._stopping = False

        async def work() -> None:
            await self._work()

        self._task = asyncio.create_task(work(), name=self.name)
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled() or self._on_end is None:
            return
        self._on_end(self.name, task.exception())

    async def _stop(self) -> None:
        task, self._stopping = self._task, True
        if task is None:
            return
        self._ask_stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), self.drain_timeout_s)
        except TimeoutError:
            log.warning("did not drain in time; cancelled", component=self.name, timeout_s=self.drain_timeout_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception as exc:  # noqa: BLE001 - the end was reported when it happened
            log.debug("ended with an error", component=self.name, error=repr(exc))


class Site(Component):
    """A second HTTP site of the process, on a port of its own (not shared with the
    other workers): a worker's own /metrics, /healthz and /readyz."""

    def __init__(self, name: str, app: web.Application, host: str, port: int) -> None:
        super().__init__(name)
        self.app, self.host, self.port = app, host, port
        self._runner: web.AppRunner | None = None

    async def _start(self) -> None:
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, backlog=128).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def _stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
