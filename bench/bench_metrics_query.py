"""Benchmark of the metrics query API over stored rollups, beside a plain CQL read of the
same rows in the same run. Needs the local stack (``headwater stack up``).

    .venv/bin/python bench/bench_metrics_query.py [--names 300] [--rounds 20]

Stored: two sources with ``--names`` track events each; a week of 1h and 1d rows for every
event, and 24 h of 1m rows for event 0 plus ``--active`` other events per minute. Queries:

  (a) one event's count over 24 h at 1-minute sampling, grouped by source
  (b) one source's distinct users over 7 days at 1 h
  (c) /api/v1/metricnames and /api/v1/datapoints/query/tags over 24 h

Each is timed through the HTTP API (p50/p99 over the rounds) beside the CQL reads that fetch
the rows the answer needs, through the same driver. Figures depend on the machine and what
else runs on it; compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.cassandra import CassandraClient
from services.metrics.app import build_app
from services.metrics.rollup import BUCKET_MS, RowKey, WindowRow
from services.metrics.schema import migrate_schema
from services.metrics.settings import Settings
from services.metrics.store import Store

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
SOURCES = ("web", "srv")


def row(rnd: random.Random, users: int) -> WindowRow:
    r = WindowRow(12)
    for _ in range(rnd.randint(1, 20)):
        r.sketch().update(f"u{rnd.randrange(users)}")
        r.count += 1
    return r


async def fill(store: Store, names: int, active: int, now: int) -> int:
    rnd = random.Random(1)
    writes: list[tuple[int, RowKey, WindowRow, int]] = []
    day0 = now - now % DAY
    for source in SOURCES:
        for h in range(7 * 24):
            t = day0 - 6 * DAY + h * HOUR
            writes += [(0, RowKey("1h", source, "track", f"Event {n}", t), row(rnd, 5000), 1) for n in range(names)]
        for d in range(7):
            writes += [
                (0, RowKey("1d", source, "track", f"Event {n}", day0 - (6 - d) * DAY), row(rnd, 5000), 1)
                for n in range(names)
            ]
        for m in range(24 * 60):
            t = now - now % MIN - m * MIN
            picked = {0, *rnd.sample(range(1, names), active)}
            writes += [(0, RowKey("1m", source, "track", f"Event {n}", t), row(rnd, 500), 1) for n in picked]
    for i in range(0, len(writes), 5000):
        await store.write_rows(writes[i : i + 5000])
    for source in SOURCES:
        for n in range(names):
            await store.note_series(source, "track", f"Event {n}", ())
    return len(writes)


async def timed(call: Callable[[], Awaitable[object]], rounds: int) -> tuple[float, float]:
    took = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        took.append(time.perf_counter() - started)
    took.sort()
    return statistics.median(took) * 1000, took[min(len(took) - 1, int(len(took) * 0.99))] * 1000


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=300)
    parser.add_argument("--active", type=int, default=10, help="other events with a row in each minute")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cassandra-port", type=int, default=9042)
    args = parser.parse_args()

    run_id = uuid.uuid4().hex[:10]
    settings = Settings(cassandra_port=args.cassandra_port, cassandra_keyspace=f"benchq_{run_id}", http_port=0)
    client = CassandraClient(settings.cassandra_hosts, settings.cassandra_port)
    await client.connect()
    try:
        await migrate_schema(client, settings)
        store = Store(client, settings)
        await store.prepare()
        now = int(time.time() * 1000)
        t0 = time.perf_counter()
        rows = await fill(store, args.names, args.active, now)
        print(
            f"stored {rows} rollup rows ({args.names} events x {len(SOURCES)} sources) in "
            f"{time.perf_counter() - t0:.1f}s"
        )
        app = await build_app(settings, consume=False)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        ks = settings.cassandra_keyspace
        day_ago = now - DAY
        week_ago = now - now % DAY - 6 * DAY

        async def cql(statement: str, params: list[tuple[object, ...]]) -> None:
            prepared = await client.prepare(statement)
            for p in params:
                bound = prepared.bind(p)
                bound.fetch_size = 5000
                await asyncio.to_thread(lambda b=bound: list(client.session.execute(b, timeout=30)))

        m_buckets = range(day_ago // BUCKET_MS["1m"], now // BUCKET_MS["1m"] + 1)
        h_buckets = range(week_ago // BUCKET_MS["1h"], now // BUCKET_MS["1h"] + 1)
        plain = {
            "a": lambda: cql(
                f"SELECT window_start, count FROM {ks}.rollup_1m WHERE source = ? AND bucket = ? AND "
                "window_start >= ? AND window_start <= ? AND type = 'track' AND event = 'Event 0' "
                "ALLOW FILTERING",
                [(s, b, day_ago, now) for s in SOURCES for b in m_buckets],
            ),
            "b": lambda: cql(
                f"SELECT window_start, users FROM {ks}.rollup_1h WHERE source = ? AND bucket = ? AND "
                "window_start >= ? AND window_start <= ?",
                [("web", b, week_ago, now) for b in h_buckets],
            ),
            "c": lambda: cql(f"SELECT source, type, event FROM {ks}.series WHERE k = 0", [()]),
        }
        bodies = {
            "a": {
                "start_absolute": day_ago,
                "end_absolute": now,
                "metrics": [
                    {
                        "name": "headwater.events.count",
                        "tags": {"event": ["Event 0"], "resolution": ["1m"]},
                        "group_by": [{"name": "tag", "tags": ["source"]}],
                        "aggregators": [{"name": "sum", "sampling": {"value": 1, "unit": "minutes"}}],
                    }
                ],
            },
            "b": {
                "start_absolute": week_ago,
                "end_absolute": now,
                "metrics": [
                    {
                        "name": "headwater.users.distinct",
                        "tags": {"source": ["web"], "resolution": ["1h"]},
                        "aggregators": [{"name": "distinct", "sampling": {"value": 1, "unit": "hours"}}],
                    }
                ],
            },
        }
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}/api/v1"

            async def post(path: str, body: object) -> None:
                async with http.post(base + path, json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()

            async def metadata() -> None:
                async with http.get(base + "/metricnames") as resp:
                    assert resp.status == 200, await resp.text()
                await post(
                    "/datapoints/query/tags",
                    {
                        "start_absolute": day_ago,
                        "end_absolute": now,
                        "metrics": [{"name": "headwater.events.count", "tags": {"resolution": ["1m"]}}],
                    },
                )

            api = {
                "a": lambda: post("/datapoints/query", bodies["a"]),
                "b": lambda: post("/datapoints/query", bodies["b"]),
                "c": metadata,
            }
            labels = {
                "a": "(a) event count, 24 h at 1 min, by source",
                "b": "(b) distinct users, 7 d at 1 h",
                "c": "(c) metricnames + query/tags",
            }
            print(f"{'query':<44}{'API p50':>9}{'p99':>9}{'CQL p50':>9}{'p99':>9}{'ratio':>7}  (ms)")
            for name in ("a", "b", "c"):
                await api[name]()  # warm: prepared statements, caches
                a50, a99 = await timed(api[name], args.rounds)
                c50, c99 = await timed(plain[name], args.rounds)
                print(f"{labels[name]:<44}{a50:>9.1f}{a99:>9.1f}{c50:>9.1f}{c99:>9.1f}{a50 / c50:>7.2f}")
        await runner.cleanup()
        print(f"peak RSS of the bench process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        await client.execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra_keyspace}")
        await client.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
