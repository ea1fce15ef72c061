"""headwater-metrics: rollups from events.enriched and the KairosDB-compatible API.

headwater-metrics                          serve (consume + HTTP API)
headwater-metrics migrate                  create or migrate the Cassandra schema, then exit
headwater-metrics claim --from-group OLD   hand the keyspace's rollups over from consumer group
                                           OLD (a renamed deployment) to the configured group,
                                           with OLD's checkpoints; stop OLD's members first
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.logging import configure_logging
from services.common.process import exit_on_config_error
from services.common.runner import run
from services.common.settings import load_settings
from services.metrics.app import build_service, cassandra_client
from services.metrics.schema import migrate_schema
from services.metrics.settings import Settings
from services.metrics.store import Store


async def _migrate(settings: Settings) -> list[int]:
    client = cassandra_client(settings)
    await client.connect()
    try:
        return await migrate_schema(client, settings)
    finally:
        await client.close()


async def _claim(settings: Settings, old_group: str) -> int:
    client = cassandra_client(settings)
    await client.connect()
    try:
        await migrate_schema(client, settings)
        store = Store(client, settings)
        await store.prepare()
        return await store.hand_over(old_group, settings.consumer_group, settings.enriched_topic)
    finally:
        await client.close()


@exit_on_config_error
def _main() -> int:
    parser = argparse.ArgumentParser(
        prog="headwater-metrics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate", "claim"])
    parser.add_argument("--from-group", help="with claim: the consumer group that owned the keyspace")
    args = parser.parse_args()
    settings = load_settings(Settings)
    configure_logging(settings.service_name, settings.log_level)
    if args.command == "migrate":
        applied = asyncio.run(_migrate(settings))
        print(f"keyspace {settings.cassandra_keyspace}: applied {applied or 'nothing (up to date)'}")  # noqa: T201
        return 0
    if args.command == "claim":
        if not args.from_group:
            parser.error("claim needs --from-group")
        moved = asyncio.run(_claim(settings, args.from_group))
        print(  # noqa: T201
            f"keyspace {settings.cassandra_keyspace}: {settings.consumer_group} owns the rollups now; "
            f"{moved} partition checkpoints taken over from {args.from_group}"
        )
        return 0

    return run(
        lambda: build_service(settings),
        host=settings.http_host,
        port=settings.http_port,
        drain_timeout_s=settings.shutdown_timeout_s,
        gc_young_threshold=settings.gc_young_threshold,
    )


def main() -> int:
    return _main()


if __name__ == "__main__":
    sys.exit(main())
