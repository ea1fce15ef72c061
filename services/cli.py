"""``headwater``: the project command (local stack, demo fleet, migrations)."""

from __future__ import annotations

import argparse
import sys

from services.devstack import stack
from services.devstack.server import StackError


def _stack(args: argparse.Namespace) -> int:
    settings = stack.StackSettings()
    if args.nodes > 1 or args.action in ("down", "status"):
        return _cluster(args)
    if args.action == "up":
        try:
            timings = stack.up(settings, kinesis=args.kinesis, opensearch=args.opensearch)
            if args.prometheus:
                from services.devstack.prometheus import prometheus_url, start_prometheus

                timings["prometheus"] = start_prometheus(settings)[1]
                print(f"Prometheus on {prometheus_url(settings)} (alerts: {prometheus_url(settings)}/alerts)")
        except StackError as exc:
            print(f"stack up failed: {exc}", file=sys.stderr)
            return 1
        for name, seconds in timings.items():
            print(f"{name} answers after {seconds:.1f}s")
        print("\n".join(stack.status(settings)))
    elif args.action == "down":
        stopped = stack.down(settings)
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
    elif args.action == "status":
        print("\n".join(stack.status(settings)))
    elif args.action == "logs":
        from services.devstack.kinesis import kinesis_server
        from services.devstack.opensearch import opensearch_server
        from services.devstack.prometheus import prometheus_server

        for server in (
            stack.kafka_server(settings),
            stack.cassandra_server(settings),
            kinesis_server(settings),
            prometheus_server(settings),
            opensearch_server(settings),
        ):
            print(f"==> {server.log_file} <==\n{server.log_tail(args.lines)}\n")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    """``stack up --nodes N``; ``down`` and ``status`` cover the single-node stack and the cluster."""
    from services.devstack.cluster import default_cluster

    settings = stack.StackSettings()
    cluster = default_cluster(args.nodes if args.nodes > 1 else None)
    if args.action == "up":
        try:
            timings = cluster.up()
        except StackError as exc:
            print(f"stack up --nodes {args.nodes} failed: {exc}", file=sys.stderr)
            return 1
        for name, seconds in timings.items():
            print(f"{name} answers after {seconds:.1f}s")
        print(f"Kafka bootstrap {cluster.kafka_bootstrap}; Cassandra hosts {','.join(cluster.cassandra_hosts)}")
        print("\n".join(cluster.status()))
    elif args.action == "down":
        stopped = stack.down(settings) + cluster.down()
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
    elif args.action == "status":
        print("\n".join(stack.status(settings) + cluster.status()))
    elif args.action == "logs":
        for server in cluster.servers():
            print(f"==> {server.log_file} <==\n{server.log_tail(args.lines)}\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from services.fleet import run_fleet

    root = Path(args.root).resolve()
    return asyncio.run(run_fleet(root, demo=args.demo, duration_s=args.duration))


def _spool(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    import orjson

    from services.common.settings import load_settings
    from services.ingest.settings import Settings
    from services.ingest.spooltool import inspect_segment, replay_segment

    path = Path(args.segment)
    if not path.is_file():
        print(f"no such spool segment: {path}", file=sys.stderr)
        return 1
    if args.action == "inspect":
        print(orjson.dumps(inspect_segment(path).summary(), option=orjson.OPT_INDENT_2).decode())
        return 0
    settings = load_settings(Settings)
    sent = asyncio.run(
        replay_segment(
            path,
            bootstrap=args.bootstrap or settings.kafka_bootstrap,
            dlq_topic=settings.dlq_topic,
            everything=args.all,
        )
    )
    print(f"replayed {sent} records from {path}; the file moved to {path.parent / 'replayed'}")
    return 0


def _parity(args: argparse.Namespace) -> int:
    import asyncio

    from services.bridge.parity import parse_time
    from services.bridge.report import parity_command

    return asyncio.run(
        parity_command(
            source=args.source,
            from_ms=parse_time(args.from_),
            to_ms=parse_time(args.to),
            as_json=args.json,
            threshold=args.threshold,
            metrics_file=args.metrics_file,
        )
    )


def main(argv: list[str] | None = None) -> int:  # long: the argparse table of every command
    parser = argparse.ArgumentParser(prog="headwater", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stack_cmd = commands.add_parser("stack", help="local Kafka and Cassandra, no Docker")
    stack_cmd.add_argument("action", choices=["up", "down", "status", "logs"])
    stack_cmd.add_argument("--lines", type=int, default=40, help="log lines for 'logs'")
    stack_cmd.add_argument(
        "--prometheus",
        action="store_true",
        help="'up' also starts Prometheus (Debian's package) with Headwater's alert rules; "
        "it scrapes what `headwater run` starts",
    )
    stack_cmd.add_argument(
        "--kinesis",
        action="store_true",
        help="'up' also starts the Kinesis-compatible server (kinesalite) for the bridge",
    )
    stack_cmd.add_argument(
        "--opensearch",
        action="store_true",
        help="'up' also starts a single OpenSearch 2.19 node on 127.0.0.1:9200 "
        "(HEADWATER_STACK_OPENSEARCH_*) for the log search tests",
    )
    stack_cmd.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="'up': N Kafka brokers and N Cassandra nodes on 127.0.0.2.. "
        "(services/devstack/cluster.py; HEADWATER_CLUSTER_* settings)",
    )
    stack_cmd.set_defaults(func=_stack)
    run_cmd = commands.add_parser("run", help="the local fleet on the dev stack (starts it if needed)")
    run_cmd.add_argument("--demo", action="store_true", help="send demo traffic")
    run_cmd.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    run_cmd.add_argument("--root", default=".", help="the repository (config/, var/)")
    run_cmd.set_defaults(func=_run)
    spool_cmd = commands.add_parser("spool", help="inspect or replay an ingest spool segment set aside as damaged")
    spool_cmd.add_argument("action", choices=["inspect", "replay"])
    spool_cmd.add_argument("segment", help="a seg-*.log file, e.g. var/spool/ingest/worker-0/damaged/seg-...log")
    spool_cmd.add_argument(
        "--all", action="store_true", help="replay every good frame, not only those recovered from damaged ranges"
    )
    spool_cmd.add_argument("--bootstrap", default=None, help="Kafka (default HEADWATER_INGEST_KAFKA_BOOTSTRAP)")
    spool_cmd.set_defaults(func=_spool)
    parity_cmd = commands.add_parser(
        "parity",
        help="compare what the legacy Kinesis stream carried with Headwater's rollups, per minute",
        description="Exit status 1 when a minute's difference exceeds --threshold. Settings: HEADWATER_BRIDGE_* "
        "(Cassandra, Kafka, metrics_url).",
    )
    parity_cmd.add_argument("--source", required=True, help="source id")
    parity_cmd.add_argument("--from", dest="from_", required=True, help="start, ISO-8601 (UTC if naive) or epoch ms")
    parity_cmd.add_argument("--to", required=True, help="end (exclusive), ISO-8601 or epoch ms")
    parity_cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    parity_cmd.add_argument(
        "--threshold", type=int, default=0, help="largest per-minute difference still accepted (default 0)"
    )
    parity_cmd.add_argument(
        "--metrics-file", default=None, help="also write the comparison's gauges here (Prometheus textfile format)"
    )
    parity_cmd.set_defaults(func=_parity)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
