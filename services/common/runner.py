"""Run a service's aiohttp application: uvloop, SO_REUSEPORT, N worker
processes, and a graceful, bounded drain on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.process import BaseProcess
from typing import Any

import structlog
import uvloop
from aiohttp import web

from services.common.errors import HeadwaterError

log = structlog.get_logger(__name__)

AppFactory = Callable[[int], Awaitable[web.Application]]
# Wraps the listening socket's protocol factory (ingest's connection guard).
ProtocolWrapper = Callable[[Callable[[], asyncio.BaseProtocol]], Callable[[], asyncio.BaseProtocol]]


def tune_gc(young_threshold: int) -> None:
    """Call once start-up is done. Start-up objects (modules, parsers, clients,
    caches so far) are never garbage: freeze them out of every later collection,
    and collect the young generation every ``young_threshold`` allocations."""
    gc.freeze()
    gc.set_threshold(young_threshold, *gc.get_threshold()[1:])


async def serve_app(make_app: AppFactory, *, host: str, port: int, worker: int = 0,
                    shutdown_timeout_s: float = 15.0, gc_young_threshold: int | None = None,
                    protocol_wrapper: ProtocolWrapper | None = None, **runner_kwargs: Any) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, let in-flight
    requests finish (bounded), and run the app's cleanup contexts in reverse.
    With ``gc_young_threshold``, the collector is tuned once the app is up;
    with ``protocol_wrapper``, connections are accepted through the protocol
    factory it returns for aiohttp's."""
    app = await make_app(worker)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=shutdown_timeout_s, **runner_kwargs)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # The handler only asks for a stop; the drain happens below.
        loop.add_signal_handler(sig, stop.set)
    listener: asyncio.Server | None = None
    try:
        if protocol_wrapper is None:
            site = web.TCPSite(runner, host, port, reuse_port=True, backlog=1024)
            await site.start()
        else:
            assert runner.server is not None  # made by setup()
            listener = await loop.create_server(protocol_wrapper(runner.server), host, port,
                                                reuse_port=True, backlog=1024)
        log.info("serving", host=host, port=port, worker=worker, pid=os.getpid())
        if gc_young_threshold is not None:
            tune_gc(gc_young_threshold)
        await stop.wait()
        log.info("draining", worker=worker, timeout_s=shutdown_timeout_s)
    finally:
        if listener is not None:
            listener.close()          # stop accepting; the runner drains open connections
        await runner.cleanup()
        log.info("stopped", worker=worker)


def run(make_app: AppFactory, *, host: str, port: int, worker: int = 0,
        shutdown_timeout_s: float = 15.0, gc_young_threshold: int | None = None,
        protocol_wrapper: ProtocolWrapper | None = None, **runner_kwargs: Any) -> None:
    """Run one worker on uvloop in this process."""
    uvloop.run(serve_app(make_app, host=host, port=port, worker=worker, shutdown_timeout_s=shutdown_timeout_s,
                         gc_young_threshold=gc_young_threshold, protocol_wrapper=protocol_wrapper,
                         **runner_kwargs))


def supervise(target: Callable[[int], None], workers: int, *, restart_delay_s: float = 1.0) -> int:
    """Run ``target(worker_index)`` in ``workers`` processes sharing one port.

    A worker that dies is started again; SIGTERM/SIGINT is passed to every
    worker and the supervisor waits for them to drain.
    """
    if workers <= 1:
        target(0)
        return 0
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
        proc = ctx.Process(target=target, args=(index,), name=f"worker-{index}", daemon=False)
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
    return 0


def exit_on_config_error(main: Callable[[], int]) -> Callable[[], int]:
    """Wrap a console entry point so a bad setting ends in one clear line, exit 2."""

    def wrapped() -> int:
        try:
            return main()
        except HeadwaterError as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
            return 2

    return wrapped
