"""``headwater parity``: the parity report as a command (prints, gauges, exit status)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import aiohttp
import orjson
import structlog
from prometheus_client import CollectorRegistry, write_to_textfile

from services.bridge.errors import CASSANDRA_ERRORS
from services.bridge.metrics import ParityMetrics, make_parity_metrics
from services.bridge.parity import MINUTE_MS, Report, run_parity
from services.bridge.settings import Settings
from services.bridge.store import Store, cassandra_store
from services.common.errors import HeadwaterError
from services.common.settings import load_settings
from services.common.sources import SourceRegistry

log = structlog.get_logger(__name__)

# What makes a comparison impossible (a server away, a bad answer), as opposed to a bug.
CANNOT_RUN: tuple[type[Exception], ...] = (
    OSError,
    RuntimeError,
    aiohttp.ClientError,
    HeadwaterError,
    *CASSANDRA_ERRORS,
)


def set_gauges(report: Report, metrics: ParityMetrics) -> None:
    """The last comparison as Prometheus gauges (largest difference, cells differing, when)."""
    metrics.difference.labels(report.source).set(report.max_difference)
    metrics.minutes_differing.labels(report.source).set(len(report.cells))
    metrics.last_run.labels(report.source).set(time.time())


def metrics_auth(settings: Settings) -> aiohttp.BasicAuth | None:
    if not settings.metrics_user:
        return None
    password = settings.metrics_password.get_secret_value() if settings.metrics_password else ""
    return aiohttp.BasicAuth(settings.metrics_user, password)


class ParityWatch:
    """In the bridge service: every ``parity_interval_s``, the comparison of each bridged
    source over the last ``parity_window_s`` (ending ``parity_lag_s`` ago, so events
    still on their way through the processor and metrics do not count as missing),
    as the parity gauges on the bridge's /metrics. Counts only: the messageIds are
    for ``headwater parity``."""

    def __init__(self, settings: Settings, registry: SourceRegistry, store: Store, metrics: ParityMetrics) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.metrics = metrics

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.settings.parity_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            for source in self.registry.sources():
                if source.legacy_streams("bridge"):
                    await self.compare(source.id)

    async def compare(self, source_id: str) -> Report | None:
        s = self.settings
        to_ms = int((time.time() - s.parity_lag_s) * 1000) // MINUTE_MS * MINUTE_MS
        try:
            report = await run_parity(
                self.store,
                source=source_id,
                from_ms=to_ms - int(s.parity_window_s * 1000),
                to_ms=to_ms,
                metrics_url=s.metrics_url,
                bootstrap=s.kafka_bootstrap,
                enriched_topic=s.enriched_topic,
                threshold=0,
                scan_limit=0,
                skew_ms=0,
                auth=metrics_auth(s),
                with_ids=False,
            )
        except CANNOT_RUN as exc:
            log.warning("parity comparison could not run", source=source_id, error=f"{type(exc).__name__}: {exc}")
            return None
        set_gauges(report, self.metrics)
        if report.cells:
            log.warning("parity differs", source=source_id, cells=len(report.cells), largest=report.max_difference)
        return report


async def parity_command(
    *, source: str, from_ms: int, to_ms: int, as_json: bool, threshold: int, metrics_file: str | None
) -> int:
    """Print the report; 0 when every difference is within the threshold, 1 beyond, 2 when it could not run."""
    settings = load_settings(Settings)
    auth = metrics_auth(settings)
    try:
        async with cassandra_store(settings) as store:
            report = await run_parity(
                store,
                source=source,
                from_ms=from_ms,
                to_ms=to_ms,
                metrics_url=settings.metrics_url,
                bootstrap=settings.kafka_bootstrap,
                enriched_topic=settings.enriched_topic,
                threshold=threshold,
                scan_limit=settings.parity_scan_limit,
                skew_ms=int(settings.max_future_skew_s * 1000),
                auth=auth,
            )
    except CANNOT_RUN as exc:
        print(f"parity could not run: {type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if as_json:
        print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())  # noqa: T201
    else:
        print(report.to_text())  # noqa: T201
    if metrics_file:
        registry = CollectorRegistry()
        set_gauges(report, make_parity_metrics(registry))
        write_to_textfile(metrics_file, registry)
    return 1 if report.exceeded else 0
