"""``headwater``: the project command (local stack, demo fleet, migrations)."""

from __future__ import annotations

import argparse
import sys

from services.devstack import stack


def _stack(args: argparse.Namespace) -> int:
    settings = stack.StackSettings()
    if args.action == "up":
        try:
            timings = stack.up(settings)
        except stack.StackError as exc:
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
        for server in (stack.kafka_server(settings), stack.cassandra_server(settings)):
            print(f"==> {server.log_file} <==\n{server.log_tail(args.lines)}\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from services.fleet import run_fleet

    root = Path(args.root).resolve()
    return asyncio.run(run_fleet(root, demo=args.demo, duration_s=args.duration))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headwater", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stack_cmd = commands.add_parser("stack", help="local Kafka and Cassandra, no Docker")
    stack_cmd.add_argument("action", choices=["up", "down", "status", "logs"])
    stack_cmd.add_argument("--lines", type=int, default=40, help="log lines for 'logs'")
    stack_cmd.set_defaults(func=_stack)
    run_cmd = commands.add_parser("run", help="the local fleet on the dev stack (starts it if needed)")
    run_cmd.add_argument("--demo", action="store_true", help="send demo traffic")
    run_cmd.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    run_cmd.add_argument("--root", default=".", help="the repository (config/, var/)")
    run_cmd.set_defaults(func=_run)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
