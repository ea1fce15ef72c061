"""A spool segment file: the frame format, scanning a segment for its good frames and its
damaged ranges, and the files beside a segment (its drain cursor; its damage report once it
is set aside in ``damaged/``). spool.py queues, writes and drains segments through these.

Each record is framed as ``length u32 | crc32 u32 | payload`` with the payload
``topic length u16 | key length u32 | topic | key | value``. A scan never searches byte by
byte for a frame (an event could carry bytes that look like one); only an operator's resync
(``resync_frames``, behind ``headwater spool inspect``) does.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from services.common.kafkawriter import OutRecord

_FRAME = struct.Struct(">II")  # payload length, crc32(payload)
_HEADER = struct.Struct(">HI")  # topic length, key length


def frame(record: OutRecord) -> bytes:
    """A record as the spool stores it: topic, key and value under a CRC (the headers
    follow from the topic and are added again when it is sent)."""
    topic, key = record.topic.encode(), record.key or b""
    payload = _HEADER.pack(len(topic), len(key)) + topic + key + record.value
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def parse_frame(data: bytes | memoryview, pos: int, end: int) -> tuple[OutRecord, int] | None:
    """The record framed at ``pos`` and where it ends, or None when the bytes
    there are not a whole frame that passes its CRC."""
    if pos + _FRAME.size > end:
        return None
    length, crc = _FRAME.unpack_from(data, pos)
    body_start = pos + _FRAME.size
    body_end = body_start + length
    if body_end > end or length < _HEADER.size:
        return None
    payload = bytes(data[body_start:body_end])
    if zlib.crc32(payload) != crc:
        return None
    topic_len, key_len = _HEADER.unpack_from(payload)
    topic_end = _HEADER.size + topic_len
    key_end = topic_end + key_len
    if key_end > length:
        return None
    try:
        topic = payload[_HEADER.size : topic_end].decode()
    except UnicodeDecodeError:
        return None
    return OutRecord(topic, payload[topic_end:key_end], payload[key_end:]), body_end


def read_frames(data: bytes, start: int = 0) -> tuple[list[tuple[int, OutRecord]], int]:
    """Parse records from ``start``; returns (end offset, record) pairs and the
    offset where valid data ends (a torn or corrupt frame stops the scan)."""
    out: list[tuple[int, OutRecord]] = []
    pos = start
    while (parsed := parse_frame(data, pos, len(data))) is not None:
        record, pos = parsed
        out.append((pos, record))
    return out, pos


@dataclass
class Scan:
    """What a segment holds between two offsets."""

    records: list[tuple[int, OutRecord]] = field(default_factory=list)  # (end offset, record)
    damaged: list[tuple[int, int]] = field(default_factory=list)  # [start, end) byte ranges
    end: int = 0


def scan_frames(data: bytes | memoryview, start: int, end: int, base: int = 0) -> Scan:
    """Every good frame in ``data[start:end]`` and the damaged ranges between them.

    A frame that fails its CRC is skipped by its declared length only when that
    length leads exactly to ``end`` or to another good frame (a flipped byte in
    a payload); otherwise framing is lost and the rest is one damaged range.
    Never scans byte by byte for a frame: an event could carry bytes that look
    like one. Offsets in the result are shifted by ``base``.
    """
    scan = Scan(end=end + base)
    pos = start
    while pos < end:
        parsed = parse_frame(data, pos, end)
        if parsed is not None:
            record, pos = parsed
            scan.records.append((pos + base, record))
            continue
        skip_to = None
        if pos + _FRAME.size <= end:
            length, _ = _FRAME.unpack_from(data, pos)
            nxt = pos + _FRAME.size + length
            if nxt == end or (nxt < end and parse_frame(data, nxt, end) is not None):
                skip_to = nxt
        scan.damaged.append((pos + base, (skip_to or end) + base))
        pos = skip_to or end
    return scan


def resync_frames(data: bytes, start: int, end: int) -> Iterator[tuple[int, OutRecord]]:
    """Frames found by trying every offset in ``data[start:end]``: for an operator
    recovering a damaged range after reading what it holds (``headwater spool
    inspect``), never for the drainer. Yields (start offset, record)."""
    pos = start
    while pos < end:
        parsed = parse_frame(data, pos, len(data))
        if parsed is None:
            pos += 1
            continue
        record, nxt = parsed
        yield pos, record
        pos = nxt


def is_torn_tail(data: bytes, pos: int) -> bool:
    """Bytes from ``pos`` to the end are an interrupted write, never acknowledged:
    too short for a frame header, zeros, or a frame shorter than it declares with
    no whole frame after it. A torn write is a prefix of one group write, so
    nothing frames after its first incomplete frame; a good frame further on
    means a damaged length field in front of acknowledged frames instead."""
    rest = data[pos:]
    if len(rest) < _FRAME.size or not rest.strip(b"\0"):
        return True
    length, _ = _FRAME.unpack_from(rest)
    if _FRAME.size + int(length) <= len(rest):
        return False  # a whole frame that fails its CRC: damage
    return next(resync_frames(data, pos + 1, len(data)), None) is None


@dataclass(frozen=True)
class DamagedSegment:
    """A segment set aside; ``path`` is its file in ``damaged/``."""

    path: Path
    damaged: tuple[tuple[int, int], ...]
    durable_end: int


def move_aside(seg: Path, folder: Path, report: bytes) -> Path:
    """Move ``seg`` into ``folder`` beside its report (the report first, so a
    damaged file is never found without one); its cursor goes."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / seg.name
    if target.exists():  # an adopted folder's segment of the same name
        target = folder / f"{seg.stem}-{time.time_ns()}.log"
    target.with_suffix(".damage.json").write_bytes(report)
    seg.replace(target)
    cursor_path(seg).unlink(missing_ok=True)
    fsync_dir(folder)
    return target


def read_report(path: Path) -> DamagedSegment:
    """The set-aside segment at ``path`` as its ``.damage.json`` report describes it."""
    try:
        report = orjson.loads(path.with_suffix(".damage.json").read_bytes())
        ranges = tuple((int(a), int(b)) for a, b in report.get("damaged", ()))
        return DamagedSegment(path, ranges, int(report.get("durable_end", 0)))
    except (OSError, ValueError, TypeError):
        return DamagedSegment(path, (), 0)


def read_range(path: Path, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` of a segment; fewer when the file is shorter."""
    with path.open("rb") as f:
        f.seek(start)
        return f.read(end - start)


def fsync_dir(directory: Path) -> None:
    """Make the folder's entries (a new or moved segment) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cursor_path(seg: Path) -> Path:
    """The file that remembers how far draining ``seg`` got."""
    return seg.with_suffix(".cursor")


def read_cursor(seg: Path) -> int:
    """Where draining ``seg`` goes on (0 when it never started)."""
    try:
        return int(cursor_path(seg).read_text())
    except (FileNotFoundError, ValueError):
        return 0


def write_cursor(seg: Path, offset: int) -> None:
    """Move the drain cursor of ``seg`` to ``offset`` (replaced whole, never torn)."""
    tmp = cursor_path(seg).with_suffix(".cursor.tmp")
    tmp.write_text(str(offset))
    tmp.replace(cursor_path(seg))
