"""Operator tools for spool segments set aside as damaged (``headwater spool``).

``inspect`` says what a segment holds without sending anything: its good
frames, the damaged byte ranges, and the frames a byte-by-byte resync finds
inside them. ``replay`` sends those recovered frames (or, with ``--all``,
every frame that passes its CRC) to Kafka with acks=all, then moves the file
to ``damaged/replayed/`` so /readyz stops reporting it.

The drainer already sent every frame it could frame safely, so by default
replay sends only what lies inside the damaged ranges. A resync may find a
frame an event's own bytes imitate; that is why it is an operator's step,
after ``inspect``, and never the drainer's. Nothing printed here carries an
event's value (keys are ``source:user``; write keys never reach the spool).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from services.common.badrow import BAD_ROW_SCHEMA
from services.common.kafkawriter import OutRecord
from services.ingest.spoolfile import resync_frames, scan_frames

REPLAYED_DIR = "replayed"


@dataclass(frozen=True)
class Inspection:
    path: Path
    size: int
    good: list[tuple[int, OutRecord]]
    damaged: list[tuple[int, int]]
    recovered: list[tuple[int, OutRecord]]
    report: dict[str, Any] | None

    def summary(self) -> dict[str, Any]:
        return {
            "segment": str(self.path),
            "bytes": self.size,
            "report": self.report,
            "good_frames": len(self.good),
            "damaged_ranges": [{"start": a, "end": b, "bytes": b - a} for a, b in self.damaged],
            "recovered_frames": [
                {
                    "offset": off,
                    "topic": r.topic,
                    "key": (r.key or b"").decode("utf-8", "replace"),
                    "value_bytes": len(r.value),
                }
                for off, r in self.recovered
            ],
            "topics": dict(Counter(r.topic for _, r in self.good + self.recovered)),
        }


def inspect_segment(path: Path) -> Inspection:
    data = path.read_bytes()
    scan = scan_frames(data, 0, len(data))
    recovered = [found for a, b in scan.damaged for found in resync_frames(data, a, b)]
    report_path = path.with_suffix(".damage.json")
    report = orjson.loads(report_path.read_bytes()) if report_path.exists() else None
    return Inspection(path, len(data), scan.records, scan.damaged, recovered, report)


async def replay_segment(path: Path, *, bootstrap: str, dlq_topic: str, everything: bool = False) -> int:
    """Send the recovered frames (all good ones with ``everything``); returns how many."""
    found = inspect_segment(path)
    records = [
        r for _, r in (sorted(found.good + found.recovered, key=lambda f: f[0]) if everything else found.recovered)
    ]
    if records:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            acks = []
            for r in records:
                schema = BAD_ROW_SCHEMA.encode() if r.topic == dlq_topic else b"envelope/1"
                acks.append(await producer.send(r.topic, r.value, key=r.key, headers=[("hw-schema", schema)]))
            await asyncio.gather(*acks)
        finally:
            await producer.stop()
    done = path.parent / REPLAYED_DIR
    done.mkdir(exist_ok=True)
    for p in (path, path.with_suffix(".damage.json")):
        if p.exists():
            p.replace(done / p.name)
    return len(records)
