"""``headwater-ingest``: the Segment tracking API into Kafka."""

from __future__ import annotations

import sys
from functools import partial

from aiohttp import web

from services.common.logging import configure_logging
from services.common.runner import exit_on_config_error, run, supervise
from services.common.settings import load_settings
from services.ingest.app import create_app
from services.ingest.settings import Settings


def _worker(settings: Settings, index: int) -> None:
    configure_logging(settings.service_name, settings.log_level)

    async def make(worker: int) -> web.Application:
        return create_app(settings, worker)

    # auto_decompress off: ingest decodes bodies itself, with the size limit
    # applied to the decoded bytes as they stream in.
    run(make, host=settings.http_host, port=settings.http_port, worker=index,
        shutdown_timeout_s=settings.shutdown_timeout_s, auto_decompress=False)


@exit_on_config_error
def main() -> int:
    settings = load_settings(Settings)
    configure_logging(settings.service_name, settings.log_level)
    return supervise(partial(_worker, settings), settings.workers)


if __name__ == "__main__":
    sys.exit(main())
