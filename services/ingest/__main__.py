"""``headwater-ingest``: the Segment tracking API into Kafka."""

from __future__ import annotations

import sys
from functools import partial

from services.common.logging import configure_logging
from services.common.process import exit_on_config_error, supervise
from services.common.settings import load_settings
from services.ingest.app import run_worker
from services.ingest.settings import Settings


@exit_on_config_error
def main() -> int:
    settings = load_settings(Settings)
    configure_logging(settings.service_name, settings.log_level)
    # run_worker lives in an importable module: worker processes are spawned
    # and must be able to find it by name.
    return supervise(partial(run_worker, settings), settings.workers)


if __name__ == "__main__":
    sys.exit(main())
