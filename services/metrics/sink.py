"""Optional sink: the flushed rollup rows, sent to an external KairosDB over REST.

Batched and gzip'd. Each metric always has one number format (counts and
distinct users as longs, property sums as doubles with a decimal point) so
KairosDB keeps one row type per series. Rows go per Kafka partition (tag
``kpart``): KairosDB overwrites a point with the same time and tags, so a
resend is harmless, and sums across partitions are a KairosDB ``sum`` over
the kpart tag. Distinct users cannot be unioned there; the per-partition
estimate is sent and the exact union is in this service's own API.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from typing import Any

import aiohttp
import orjson
import structlog

from services.metrics.flush import FlushedRow
from services.metrics.kairos import COUNT_METRIC, SUM_METRIC, USERS_METRIC
from services.metrics.metrics import MetricsMetrics
from services.metrics.settings import Settings

log = structlog.get_logger(__name__)

# KairosDB refuses empty tag values; identify/group/alias events have no name.
NO_NAME = "_"
_ATTEMPTS = 3


def datapoints(rows: list[FlushedRow]) -> list[dict[str, Any]]:
    """KairosDB write entries for flushed rows (one entry per series and point)."""
    out: list[dict[str, Any]] = []
    for kpart, key, row in rows:
        tags = {
            "source": key.source,
            "type": key.type,
            "event": key.event or NO_NAME,
            "resolution": key.resolution,
            "kpart": str(kpart),
        }
        out.append({"name": COUNT_METRIC, "tags": tags, "datapoints": [[key.window_start, int(row.count)]]})
        estimate = round(row.sketch().get_estimate())
        out.append({"name": USERS_METRIC, "tags": tags, "datapoints": [[key.window_start, int(estimate)]]})
        out.extend(
            {"name": SUM_METRIC, "tags": {**tags, "property": prop}, "datapoints": [[key.window_start, float(value)]]}
            for prop, value in row.sums.items()
        )
    return out


class KairosSink:
    """A bounded queue of batches and one watched sender task."""

    def __init__(self, settings: Settings, metrics: MetricsMetrics) -> None:
        self.url = settings.kairosdb_url.rstrip("/") + "/api/v1/datapoints"
        self.batch_size = settings.kairosdb_batch_size
        self.timeout = aiohttp.ClientTimeout(total=settings.kairosdb_timeout_s)
        self.metrics = metrics
        self.queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue(settings.kairosdb_max_pending)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def enqueue(self, rows: list[FlushedRow]) -> None:
        """Called after a flush; never blocks the consumer (the oldest batch gives way)."""
        points = datapoints(rows)
        for i in range(0, len(points), self.batch_size):
            if self.queue.full():
                self.queue.get_nowait()
                self.queue.task_done()
                self.metrics.sink_dropped.inc()
            self.queue.put_nowait(points[i : i + self.batch_size])

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        self._task = asyncio.create_task(self._send_loop(), name="kairosdb-sink")
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("kairosdb sink stopped", error=repr(task.exception()))

    async def stop(self, drain_s: float = 5.0) -> None:
        """Send what is queued (bounded), then close; safe to call twice."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.queue.join(), drain_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send_loop(self) -> None:
        while True:
            batch = await self.queue.get()
            try:
                await self._send(batch)
            finally:
                self.queue.task_done()

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        assert self._session is not None
        body = gzip.compress(orjson.dumps(batch), compresslevel=5)
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with self._session.post(
                    self.url, data=body, headers={"Content-Type": "application/gzip"}
                ) as resp:
                    if resp.status == 204:
                        self.metrics.sink_points.inc(len(batch))
                        return
                    text = (await resp.text())[:300]
                    log.warning("kairosdb refused a batch", status=resp.status, body=text, attempt=attempt)
                    if resp.status < 500:
                        break  # the same body will be refused again
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("kairosdb did not answer", error=f"{type(exc).__name__}: {exc}", attempt=attempt)
            await asyncio.sleep(0.5 * attempt)
        self.metrics.sink_errors.inc()
