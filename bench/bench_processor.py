"""Processor throughput against the real Kafka, beside a plain consume-then-produce loop.

    .venv/bin/python bench/bench_processor.py [--events 50000] [--partitions 4] [--rounds 3]
        [--set NAME=VALUE ...]

Fills a fresh raw topic with N envelopes (varied user agents, IPs, page URLs),
then drains it with ONE process in its own consumer group, alternating two
loops for a few rounds (fresh group each time):

1. plain: consume events.raw, produce each value unchanged to another topic
   (idempotent, acks=all, same compression), commit offsets per batch; no
   decoding, no enrichment, no transactions.
2. processor: ``python -m services.processor`` with transactions, dedupe
   changelog, enrichment and routing.

For each it prints events/s (measured from the first committed offset to the
last, so start-up and group join are left out), CPU seconds per 1,000 events
(utime+stime of the process over the same span), peak RSS, and p50/p99 of
the time one batch takes (read from the process's own histogram), then the
ratio processor/plain per round and its median. The goals: 0.6 or more by
events/s, 0.5 or more by CPU per event (plain's CPU per event over the
processor's). On a shared machine events/s swings with the other work; CPU
per event is the steadier of the two.
Every enrichment step is on, with a small generated geo-IP database covering
half of the (random) client addresses. The bench source routes every event
to one destination (as the demo's
"warehouse" rule does) and order events to a second, so the processor
writes about two records per event, plus one changelog record per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.kafka import TopicSpec, ensure_topics  # noqa: E402
from services.common.proto.envelope_pb2 import Envelope  # noqa: E402

UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 "
    "Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
    "Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
]
SOURCES = {
    "sources": [
        {
            "id": "bench",
            "name": "bench",
            "write_key": "bench-key",
            "enrichment": {"ip": "anonymize"},
            "destinations": [{"name": "all"}, {"name": "orders", "types": ["track"], "events": ["Order Completed"]}],
        }
    ]
}


# processor / plain: events/s, and plain CPU per event / processor CPU per event.
GOAL_RATE, GOAL_CPU = 0.6, 0.5


def make_event(i: int, rng: random.Random) -> tuple[bytes, bytes]:
    user = f"user-{rng.randrange(5000)}"
    kind = rng.choice(["page", "track", "track", "identify"])
    event: dict[str, Any] = {
        "type": kind,
        "userId": user,
        "messageId": str(uuid.uuid4()),
        "timestamp": "2026-11-24T15:00:00.000Z",
        "sentAt": "2026-11-24T15:00:01.000Z",
        "context": {
            "library": {"name": "analytics.js", "version": "1.84"},
            "locale": "en-GB",
            "page": {
                "url": f"https://shop.example.com/p/{i % 300}?utm_source=news&utm_medium=email"
                f"&utm_campaign=c{i % 7}&gclid=g{i}",
                "referrer": rng.choice(["https://www.google.com/", "https://t.co/x", ""]),
            },
        },
    }
    if kind == "track":
        event["event"] = rng.choice(["Order Completed", "Product Viewed", "Added To Cart"])
        event["properties"] = {"revenue": round(rng.random() * 100, 2), "sku": f"sku-{i % 50}"}
    elif kind == "page":
        event["name"] = "Product"
        event["properties"] = {"path": f"/p/{i % 300}"}
    else:
        event["traits"] = {"email": f"{user}@example.com", "plan": "pro"}
    ip = f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
    env = Envelope(
        schema_version=1,
        source_id="bench",
        message_id=event["messageId"],
        received_at_ms=int(time.time() * 1000),
        client_ip=ip,
        user_agent=rng.choice(UAS),
        request_id="bench",
        path="/v1/batch",
        event=orjson.dumps(event),
    )
    return f"bench:{user}".encode(), env.SerializeToString()


def build_geoip(path: Path) -> None:
    """A City database covering every other /8 of the bench's random IPv4 addresses."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, database_type="GeoIP2-City", ipv4_compatible=True)
    for first in range(1, 224, 2):
        writer.insert_network(
            IPSet([f"{first}.0.0.0/8"]),
            {
                "country": {"iso_code": "GB", "names": {"en": "United Kingdom"}},
                "subdivisions": [{"iso_code": "ENG", "names": {"en": "England"}}],
                "city": {"names": {"en": f"City {first}"}},
                "location": {"latitude": 51.5, "longitude": -0.1, "time_zone": "Europe/London"},
            },
        )
    writer.to_db_file(str(path))


async def fill(bootstrap: str, topic: str, n: int) -> None:
    rng = random.Random(7)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=20,
        max_batch_size=256 * 1024,
        compression_type="zstd",
    )
    await producer.start()
    try:
        futures = []
        for i in range(n):
            key, value = make_event(i, rng)
            futures.append(await producer.send(topic, value, key=key, headers=[("hw-schema", b"envelope/1")]))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def committed(bootstrap: str, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except KafkaError:
        return 0
    finally:
        await admin.close()
    return sum(m.offset for tp, m in offsets.items() if tp.topic == topic and m.offset > 0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(
    bootstrap: str, group: str, topic: str, n: int, proc: subprocess.Popen[bytes], timeout_s: float
) -> dict[str, float]:
    """Poll the group's committed offsets from the first commit to the last."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    start_t = start_cpu = 0.0
    start_done = -1
    done = 0
    while loop.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}")
        done = await committed(bootstrap, group, topic)
        if start_done < 0 and done > 0:
            start_t, start_cpu, start_done = time.perf_counter(), cpu_seconds(proc.pid), done
        if done >= n:
            break
        await asyncio.sleep(0.05)
    else:
        raise SystemExit(f"timed out: {done} of {n} committed")
    elapsed = time.perf_counter() - start_t
    events = n - start_done
    cpu = cpu_seconds(proc.pid) - start_cpu
    return {
        "events_per_s": events / elapsed,
        "cpu_s_per_1000": cpu / events * 1000,
        "peak_rss_mb": peak_rss_mb(proc.pid),
        "events_timed": events,
        "seconds": elapsed,
    }


async def plain_worker(bootstrap: str, raw: str, out: str, group: str, max_records: int) -> None:
    """The baseline loop, run in its own process by ``--plain-worker``."""
    consumer = AIOKafkaConsumer(
        raw,
        bootstrap_servers=bootstrap,
        group_id=group,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
        compression_type="zstd",
    )
    await consumer.start()
    await producer.start()
    times: list[float] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=max_records)
            if not batch:
                continue
            started = time.perf_counter()
            futures = [await producer.send(out, r.value, key=r.key) for rs in batch.values() for r in rs]
            await asyncio.gather(*futures)
            await consumer.commit()
            times.append(time.perf_counter() - started)
    finally:
        await producer.stop()
        await consumer.stop()
    with open(os.environ["BENCH_TIMES"], "wb") as fh:
        fh.write(orjson.dumps(times))


def quantiles_from_times(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    if not values:
        return float("nan"), float("nan")
    return values[len(values) // 2], values[min(len(values) - 1, int(len(values) * 0.99))]


async def quantiles_from_histogram(port: int, name: str) -> tuple[float, float]:
    """p50/p99 upper bucket bounds from a Prometheus histogram on /metrics."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    total = buckets[-1][1] if buckets else 0
    result = []
    for q in (0.5, 0.99):
        bound = next((le for le, count in buckets if total and count >= q * total), float("nan"))
        result.append(bound)
    return result[0], result[1]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(args: argparse.Namespace) -> None:
    bootstrap = args.bootstrap
    tag = uuid.uuid4().hex[:8]
    raw = f"bench.raw.{tag}"
    await ensure_topics(bootstrap, [TopicSpec(raw, args.partitions)])
    t0 = time.perf_counter()
    await fill(bootstrap, raw, args.events)
    print(f"processor settings: {args.set or 'defaults'}")
    print(f"filled {raw}: {args.events} envelopes, {args.partitions} partitions, in {time.perf_counter() - t0:.1f} s")
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = Path(tmp) / "sources.json"
        sources.write_bytes(orjson.dumps(SOURCES))
        geoip = Path(tmp) / "city.mmdb"
        build_geoip(geoip)
        # Alternate the two loops over the same filled topic (a fresh group each run), so
        # both see the same swings in load from other work on the machine.
        for index in range(args.rounds):
            plain = await run_plain(bootstrap, raw, f"{tag}-{index}", Path(tmp), args)
            processor = await run_processor(bootstrap, raw, f"{tag}-{index}", sources, geoip, args)
            rounds.append({"plain": plain, "processor": processor})

    print(f"({os.cpu_count()} cores; the Kafka broker runs on the same machine and shares them)")
    print(
        f"{'round':<6} {'loop':<10} {'events/s':>10} {'CPU s/1000':>11} {'peak RSS MB':>12} "
        f"{'batch p50 ms':>13} {'batch p99 ms':>13} {'timed events':>13}"
    )
    ratios = []
    for index, results in enumerate(rounds, 1):
        for name, r in results.items():
            print(
                f"{index:<6} {name:<10} {r['events_per_s']:>10.0f} {r['cpu_s_per_1000']:>11.3f} "
                f"{r['peak_rss_mb']:>12.0f} {r['p50_ms']:>13.1f} {r['p99_ms']:>13.1f} "
                f"{r['events_timed']:>13.0f}"
            )
        ratios.append(results["processor"]["events_per_s"] / results["plain"]["events_per_s"])
    cpu_ratio = statistics.median(r["plain"]["cpu_s_per_1000"] / r["processor"]["cpu_s_per_1000"] for r in rounds)
    ratio = statistics.median(ratios)
    print(f"processor / plain events/s per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(
        f"median ratio {ratio:.2f} (goal >= {GOAL_RATE}): {'met' if ratio >= GOAL_RATE else 'NOT met'}; "
        f"by CPU per event (plain CPU / processor CPU): {cpu_ratio:.2f} "
        f"(goal >= {GOAL_CPU}): {'met' if cpu_ratio >= GOAL_CPU else 'NOT met'}"
    )
    print("processor batch p50/p99 are histogram bucket upper bounds; plain's are exact.")


async def run_plain(bootstrap: str, raw: str, tag: str, tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    group = f"bench-plain-{tag}"
    times_file = tmp / f"times-{tag}.json"
    env = {**os.environ, "BENCH_TIMES": str(times_file)}
    await ensure_topics(bootstrap, [TopicSpec(f"{raw}.plain", 4)])
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--plain-worker",
            "--bootstrap",
            bootstrap,
            "--raw",
            raw,
            "--out",
            f"{raw}.plain",
            "--group",
            group,
        ],
        env=env,
    )
    try:
        result = await measure(bootstrap, group, raw, args.events, proc, args.timeout)
    finally:
        proc.terminate()
        proc.wait()
    times = orjson.loads(times_file.read_bytes()) if times_file.exists() else []
    result["p50_ms"], result["p99_ms"] = (v * 1000 for v in quantiles_from_times(times))
    return result


async def run_processor(
    bootstrap: str, raw: str, tag: str, sources: Path, geoip: Path, args: argparse.Namespace
) -> dict[str, float]:
    port = free_port()
    group = f"bench-proc-{tag}"
    out = f"{raw}.{tag}"
    env = {
        **os.environ,
        "HEADWATER_PROCESSOR_KAFKA_BOOTSTRAP": bootstrap,
        "HEADWATER_PROCESSOR_RAW_TOPIC": raw,
        "HEADWATER_PROCESSOR_ENRICHED_TOPIC": f"{out}.enriched",
        "HEADWATER_PROCESSOR_DLQ_TOPIC": f"{out}.dlq",
        "HEADWATER_PROCESSOR_DEST_TOPIC_PREFIX": f"{out}.dest.",
        "HEADWATER_PROCESSOR_GROUP_ID": group,
        "HEADWATER_PROCESSOR_SOURCES_FILE": str(sources),
        "HEADWATER_PROCESSOR_HTTP_PORT": str(port),
        "HEADWATER_PROCESSOR_ENRICHED_PARTITIONS": "4",
        "HEADWATER_PROCESSOR_LOG_LEVEL": "WARNING",
        "HEADWATER_PROCESSOR_GEOIP_PATH": str(geoip),
    }
    for setting in args.set:
        name, _, value = setting.partition("=")
        env[f"HEADWATER_PROCESSOR_{name.upper()}"] = value
    proc = subprocess.Popen([sys.executable, "-m", "services.processor"], cwd=REPO, env=env)
    spy = None
    if args.profile:
        # py-spy (pip install py-spy) samples the processor for the whole run; raw
        # (collapsed) stacks, one file per round, for flamegraph.pl or a quick sort.
        target = Path(args.profile) / f"processor-{tag}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(
            ["py-spy", "record", "-p", str(proc.pid), "-r", "200", "-f", "raw", "--nonblocking", "-o", str(target)],
            stdout=subprocess.DEVNULL,
        )
    try:
        result = await measure(bootstrap, group, raw, args.events, proc, args.timeout)
        p50, p99 = await quantiles_from_histogram(port, "headwater_processor_batch_seconds")
        result["p50_ms"], result["p99_ms"] = p50 * 1000, p99 * 1000
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        proc.terminate()
        proc.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--rounds", type=int, default=3, help="plain/processor pairs run alternately")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a processor setting for this run, e.g. --set batch_max_records=1000",
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="sample the processor with py-spy into DIR (one raw stack file per round)"
    )
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        import uvloop

        uvloop.run(plain_worker(args.bootstrap, args.raw, args.out, args.group, 500 * 4))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
