"""One lifecycle for every service: components started in order and stopped in
reverse, an HTTP site (API, /metrics, /healthz, /readyz), signals, a bounded
drain and the exit codes.

A service is assembled as a :class:`Service`: its aiohttp application and
the components it needs, in the order they must start. :func:`serve` runs it:

1. SIGTERM and SIGINT only ask for a stop (a second one changes nothing).
2. Components start in order; one that fails to start stops those already
   started, in reverse, and the service exits 1.
3. The HTTP site opens, so traffic arrives only once everything it uses runs.
4. The service runs until a signal, or until a component asks it to stop
   (:meth:`Service.fail`, or a :class:`Loop` whose work ended on its own).
5. The site stops accepting; requests in flight finish within the drain budget.
6. Components stop in reverse order within what is left of that budget; a
   loop that has not drained by then is cancelled.
7. The exit code: 0 for a requested stop, 1 for a failure (its supervisor
   starts the process again), 2 for a bad setting (:func:`exit_on_config_error`).

Components have ``start()``/``stop()``; ``stop()`` is safe twice and safe
before ``start()``, and every component works as ``async with``. Tests use a
service without the runner through :meth:`Service.mount`, which makes the
aiohttp test server start and stop the same components.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import structlog
import uvloop
from aiohttp import web

from services.common.components import Component, Hooks, Loop, Resource
from services.common.process import EXIT_FAILED, EXIT_OK

log = structlog.get_logger(__name__)

# Wraps the listening socket's protocol factory (ingest's connection guard).
ProtocolWrapper = Callable[[Callable[[], asyncio.BaseProtocol]], Callable[[], asyncio.BaseProtocol]]
T = TypeVar("T")
C = TypeVar("C", bound=Component)


class Service:
    """A service's HTTP application and its components, in start order."""

    def __init__(self, name: str, app: web.Application) -> None:
        self.name = name
        self.app = app
        self.components: list[Component] = []
        self.failure: str | None = None
        self._stop_requested = asyncio.Event()

    def add(self, component: C) -> C:
        self.components.append(component)
        return component

    def hooks(
        self,
        name: str,
        start: Callable[[], Awaitable[Any]] | None = None,
        stop: Callable[[], Awaitable[Any]] | None = None,
    ) -> Hooks:
        return self.add(Hooks(name, start, stop))

    def resource(self, name: str, factory: Callable[[], AbstractAsyncContextManager[T]]) -> Resource[T]:
        return self.add(Resource(name, factory))

    def loop(
        self, name: str, work: Callable[[], Awaitable[None]], ask_stop: Callable[[], None], *, drain_timeout_s: float
    ) -> Loop:
        return self.add(Loop(name, work, ask_stop, drain_timeout_s=drain_timeout_s, on_end=self._loop_ended))

    def request_stop(self) -> None:
        self._stop_requested.set()

    def fail(self, reason: str, error: BaseException | None = None) -> None:
        """Stop the service with a failure (exit 1). Components call this instead of
        signalling their own process."""
        if self.failure is None:
            self.failure = reason
            log.error("stopping the service", reason=reason, error=repr(error) if error else None, exc_info=error)
        self._stop_requested.set()

    def _loop_ended(self, name: str, error: BaseException | None) -> None:
        if error is not None:
            self.fail(f"{name} failed", error)
        else:
            log.info("ended on its own; stopping the service", component=name)
            self._stop_requested.set()

    async def wait(self) -> None:
        await self._stop_requested.wait()

    async def start(self) -> None:
        """Start every component in order; on a failure stop those started and raise."""
        for component in self.components:
            try:
                await component.start()
            except BaseException:
                await self.stop()
                raise

    async def stop(self, budget_s: float | None = None) -> None:
        """Stop every component in reverse; safe twice. With ``budget_s``, a stop that
        overruns what is left of it is abandoned (logged) and the next one begins."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        for component in reversed(self.components):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.1)
            try:
                await asyncio.wait_for(component.stop(), left)
            except TimeoutError:
                log.warning("did not stop in time", component=component.name)
            except Exception as exc:
                # One bad stop must not keep the others running.
                log.exception("stop failed", component=component.name, error=repr(exc))

    def mount(self) -> web.Application:
        """The application with the components started and stopped by aiohttp (tests,
        ``aiohttp.test_utils.TestServer``); :func:`serve` does not use this."""

        async def lifecycle(_: web.Application) -> AsyncIterator[None]:
            await self.start()
            yield
            await self.stop()

        self.app.cleanup_ctx.append(lifecycle)
        return self.app


def tune_gc(young_threshold: int) -> None:
    """Call once start-up is done. Start-up objects (modules, parsers, clients,
    caches so far) are never garbage: freeze them out of every later collection,
    and collect the young generation every ``young_threshold`` allocations."""
    gc.freeze()
    gc.set_threshold(young_threshold, *gc.get_threshold()[1:])


async def serve(
    service: Service,
    *,
    host: str,
    port: int,
    worker: int = 0,
    drain_timeout_s: float = 15.0,
    gc_young_threshold: int | None = None,
    protocol_wrapper: ProtocolWrapper | None = None,
    **runner_kwargs: Any,
) -> int:
    """Run ``service`` through the steps in this module's docstring; returns the exit code.
    ``protocol_wrapper`` accepts connections through the protocol factory it returns."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, service.request_stop)  # 1
    try:
        return await _serve(
            service,
            loop,
            host=host,
            port=port,
            worker=worker,
            drain_timeout_s=drain_timeout_s,
            gc_young_threshold=gc_young_threshold,
            protocol_wrapper=protocol_wrapper,
            **runner_kwargs,
        )
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _serve(
    service: Service,
    loop: asyncio.AbstractEventLoop,
    *,
    host: str,
    port: int,
    worker: int,
    drain_timeout_s: float,
    gc_young_threshold: int | None,
    protocol_wrapper: ProtocolWrapper | None,
    **runner_kwargs: Any,
) -> int:
    try:
        await service.start()  # 2
    except Exception as exc:
        # Any start failure is reported and ends the process (its supervisor tries again).
        log.exception("could not start", service=service.name, error=repr(exc))
        return EXIT_FAILED
    runner = web.AppRunner(
        service.app, handle_signals=False, access_log=None, shutdown_timeout=drain_timeout_s, **runner_kwargs
    )
    await runner.setup()
    listener: asyncio.Server | None = None
    started = time.monotonic()
    try:
        if protocol_wrapper is None:  # 3
            await web.TCPSite(runner, host, port, reuse_port=True, backlog=1024).start()
        else:
            assert runner.server is not None  # made by setup()
            listener = await loop.create_server(
                protocol_wrapper(runner.server), host, port, reuse_port=True, backlog=1024
            )
        log.info("serving", service=service.name, host=host, port=port, worker=worker, pid=os.getpid())
        if gc_young_threshold is not None:
            tune_gc(gc_young_threshold)
        await service.wait()  # 4
        log.info("draining", service=service.name, worker=worker, timeout_s=drain_timeout_s)
        started = time.monotonic()
    finally:
        if listener is not None:
            listener.close()  # 5
        await runner.cleanup()
        await service.stop(max(drain_timeout_s - (time.monotonic() - started), 1.0))  # 6
    log.info("stopped", service=service.name, worker=worker, failure=service.failure)
    return EXIT_OK if service.failure is None else EXIT_FAILED  # 7


def run(build: Callable[[], Service], **serve_kwargs: Any) -> int:
    """Build the service inside a uvloop event loop and serve it; returns the exit code."""

    async def main() -> int:
        return await serve(build(), **serve_kwargs)

    return uvloop.run(main())
