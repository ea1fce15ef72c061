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
import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Generic, TypeVar

import structlog
import uvloop
from aiohttp import web

from services.common.errors import HeadwaterError

log = structlog.get_logger(__name__)

# Wraps the listening socket's protocol factory (ingest's connection guard).
ProtocolWrapper = Callable[[Callable[[], asyncio.BaseProtocol]], Callable[[], asyncio.BaseProtocol]]
T = TypeVar("T")
C = TypeVar("C", bound="Component")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


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

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


class Hooks(Component):
    """A component made of two coroutine functions (either may be left out):
    a client's ``connect``/``close``, a one-off step such as a schema migration."""

    def __init__(self, name: str, start: Callable[[], Awaitable[Any]] | None = None,
                 stop: Callable[[], Awaitable[Any]] | None = None) -> None:
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

    def __init__(self, name: str, work: Callable[[], Awaitable[None]], ask_stop: Callable[[], None], *,
                 drain_timeout_s: float,
                 on_end: Callable[[str, BaseException | None], None] | None = None) -> None:
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

    def hooks(self, name: str, start: Callable[[], Awaitable[Any]] | None = None,
              stop: Callable[[], Awaitable[Any]] | None = None) -> Hooks:
        return self.add(Hooks(name, start, stop))

    def resource(self, name: str, factory: Callable[[], AbstractAsyncContextManager[T]]) -> Resource[T]:
        return self.add(Resource(name, factory))

    def loop(self, name: str, work: Callable[[], Awaitable[None]], ask_stop: Callable[[], None], *,
             drain_timeout_s: float) -> Loop:
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


async def serve(service: Service, *, host: str, port: int, worker: int = 0, drain_timeout_s: float = 15.0,
                gc_young_threshold: int | None = None, protocol_wrapper: ProtocolWrapper | None = None,
                **runner_kwargs: Any) -> int:
    """Run ``service`` through the steps in this module's docstring; returns the exit code.
    ``protocol_wrapper`` accepts connections through the protocol factory it returns."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, service.request_stop)          # 1
    try:
        return await _serve(service, loop, host=host, port=port, worker=worker, drain_timeout_s=drain_timeout_s,
                            gc_young_threshold=gc_young_threshold, protocol_wrapper=protocol_wrapper,
                            **runner_kwargs)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _serve(service: Service, loop: asyncio.AbstractEventLoop, *, host: str, port: int, worker: int,
                 drain_timeout_s: float, gc_young_threshold: int | None, protocol_wrapper: ProtocolWrapper | None,
                 **runner_kwargs: Any) -> int:
    try:
        await service.start()                                       # 2
    except Exception as exc:
        # Any start failure is reported and ends the process (its supervisor tries again).
        log.exception("could not start", service=service.name, error=repr(exc))
        return EXIT_FAILED
    runner = web.AppRunner(service.app, handle_signals=False, access_log=None,
                           shutdown_timeout=drain_timeout_s, **runner_kwargs)
    await runner.setup()
    listener: asyncio.Server | None = None
    started = time.monotonic()
    try:
        if protocol_wrapper is None:                                # 3
            await web.TCPSite(runner, host, port, reuse_port=True, backlog=1024).start()
        else:
            assert runner.server is not None  # made by setup()
            listener = await loop.create_server(protocol_wrapper(runner.server), host, port,
                                                reuse_port=True, backlog=1024)
        log.info("serving", service=service.name, host=host, port=port, worker=worker, pid=os.getpid())
        if gc_young_threshold is not None:
            tune_gc(gc_young_threshold)
        await service.wait()                                        # 4
        log.info("draining", service=service.name, worker=worker, timeout_s=drain_timeout_s)
        started = time.monotonic()
    finally:
        if listener is not None:
            listener.close()                                        # 5
        await runner.cleanup()
        await service.stop(max(drain_timeout_s - (time.monotonic() - started), 1.0))  # 6
    log.info("stopped", service=service.name, worker=worker, failure=service.failure)
    return EXIT_OK if service.failure is None else EXIT_FAILED     # 7


def run(build: Callable[[], Service], **serve_kwargs: Any) -> int:
    """Build the service inside a uvloop event loop and serve it; returns the exit code."""

    async def main() -> int:
        return await serve(build(), **serve_kwargs)

    return uvloop.run(main())


def supervise(target: Callable[[int], int | None], workers: int, *, restart_delay_s: float = 1.0) -> int:
    """Run ``target(worker_index)`` in ``workers`` processes sharing one port.

    A worker that dies is started again; SIGTERM/SIGINT is passed to every
    worker and the supervisor waits for them to drain. With one worker the
    target runs in this process and its exit code is returned.
    """
    if workers <= 1:
        return target(0) or EXIT_OK
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, BaseProcess] = {}
    stopping = False

    def on_signal(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.pid and p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start(index: int) -> None:
        proc = ctx.Process(target=_exit_with, args=(target, index), name=f"worker-{index}", daemon=False)
        proc.start()
        procs[index] = proc

    for i in range(workers):
        start(i)
    while not stopping:
        for index, proc in list(procs.items()):
            if not proc.is_alive() and not stopping:
                log.error("worker died; starting it again", worker=index, exitcode=proc.exitcode)
                time.sleep(restart_delay_s)
                start(index)
        time.sleep(0.2)
    for proc in procs.values():
        proc.join()
    return EXIT_OK


def _exit_with(target: Callable[[int], int | None], index: int) -> None:
    code = target(index)
    if code:
        sys.exit(code)


def exit_on_config_error(main: Callable[[], int]) -> Callable[[], int]:
    """Wrap a console entry point so a bad setting ends in one clear line, exit 2."""

    def wrapped() -> int:
        try:
            return main()
        except HeadwaterError as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
            return EXIT_CONFIG

    return wrapped
