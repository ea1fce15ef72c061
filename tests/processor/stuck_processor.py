"""``python -m tests.processor.stuck_processor``: headwater-processor whose dedupe read-back
never returns after the first ``HEADWATER_TEST_RESTORES`` partitions it opened.

It stands in for any wait inside a rebalance callback that never ends (aiokafka retries
the group's and the transactional producer's broker calls without a deadline): once the
next assignment opens a partition, the consumer stays out of its group for good, and only
the watchdog can get the service out of it. Everything else is the real processor.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

from services.processor import __main__ as entry
from services.processor.dedupe import DedupeWindow, restore
from services.processor.settings import Settings
from services.processor.worker import Processor

_opened = itertools.count(1)


async def restore_then_hang(settings: Settings, partition: int) -> DedupeWindow:
    if next(_opened) > int(os.environ["HEADWATER_TEST_RESTORES"]):
        await asyncio.Event().wait()  # never set
    return await restore(settings, partition)


# The processor's default for how a partition reads its dedupe state back.
defaults = Processor.__init__.__kwdefaults__
assert defaults is not None
defaults["restore_window"] = restore_then_hang

if __name__ == "__main__":
    sys.exit(entry.main())
