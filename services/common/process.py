"""The process around a service: worker processes sharing its port, and the exit
code of a bad setting."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import structlog

from services.common.errors import HeadwaterError

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


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
