"""``headwater parity``: the parity report as a command (prints, gauges, exit status)."""

from __future__ import annotations

import sys
import time

import aiohttp
import orjson
from prometheus_client import CollectorRegistry, write_to_textfile

from services.bridge.errors import CASSANDRA_ERRORS
from services.bridge.metrics import make_parity_metrics
from services.bridge.parity import Report, run_parity
from services.bridge.settings import Settings
from services.bridge.store import cassandra_store
from services.common.errors import HeadwaterError
from services.common.settings import load_settings

# What makes a comparison impossible (a server away, a bad answer), as opposed to a bug.
CANNOT_RUN: tuple[type[Exception], ...] = (OSError, RuntimeError, aiohttp.ClientError, HeadwaterError,
                                           *CASSANDRA_ERRORS)


def record_gauges(report: Report, registry: CollectorRegistry) -> None:
    """The last comparison as Prometheus gauges (largest difference, cells differing, when)."""
    metrics = make_parity_metrics(registry)
    metrics.difference.labels(report.source).set(report.max_difference)
    metrics.minutes_differing.labels(report.source).set(len(report.cells))
    metrics.last_run.labels(report.source).set(time.time())


async def parity_command(*, source: str, from_ms: int, to_ms: int, as_json: bool, threshold: int,
                         metrics_file: str | None) -> int:
    """Print the report; 0 when every difference is within the threshold, 1 beyond, 2 when it could not run."""
    settings = load_settings(Settings)
    auth = (aiohttp.BasicAuth(settings.metrics_user, settings.metrics_password.get_secret_value()
                              if settings.metrics_password else "") if settings.metrics_user else None)
    try:
        async with cassandra_store(settings) as store:
            report = await run_parity(store, source=source, from_ms=from_ms, to_ms=to_ms,
                                      metrics_url=settings.metrics_url, bootstrap=settings.kafka_bootstrap,
                                      enriched_topic=settings.enriched_topic, threshold=threshold,
                                      scan_limit=settings.parity_scan_limit,
                                      skew_ms=int(settings.max_future_skew_s * 1000), auth=auth)
    except CANNOT_RUN as exc:
        print(f"parity could not run: {type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if as_json:
        print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())  # noqa: T201
    else:
        print(report.to_text())  # noqa: T201
    if metrics_file:
        registry = CollectorRegistry()
        record_gauges(report, registry)
        write_to_textfile(metrics_file, registry)
    return 1 if report.exceeded else 0
