"""A local, fsync'd, append-only spool for events Kafka has not acknowledged.

Ingest answers 200 only once an event is in Kafka or in this spool. The
spool is a folder of segment files; each record is framed as
``length u32 | crc32 u32 | payload`` so a torn write at a crash (always one
that was never acknowledged, since we fsync before answering) is detected
and dropped on reopen. Appends are group-committed: every request waiting
at the same moment shares one write and one fsync. A cursor file per
segment remembers how far draining got, so a restart resends at most the
batch that was in flight (a duplicate, never a loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.ingest.errors import SpoolFull

log = structlog.get_logger(__name__)

_FRAME = struct.Struct(">II")        # payload length, crc32(payload)
_HEADER = struct.Struct(">HI")       # topic length, key length


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record waiting to be written."""

    topic: str
    key: bytes
    value: bytes

    def frame(self) -> bytes:
        topic = self.topic.encode()
        payload = _HEADER.pack(len(topic), len(self.key)) + topic + self.key + self.value
        return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(data: bytes, start: int = 0) -> tuple[list[tuple[int, Record]], int]:
    """Parse records from ``start``; returns (end offset, record) pairs and the
    offset where valid data ends (a torn or corrupt tail stops the scan)."""
    out: list[tuple[int, Record]] = []
    pos = start
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        body_start = pos + _FRAME.size
        payload = data[body_start:body_start + length]
        if len(payload) < length or zlib.crc32(payload) != crc or length < _HEADER.size:
            break
        topic_len, key_len = _HEADER.unpack_from(payload)
        topic_end = _HEADER.size + topic_len
        key_end = topic_end + key_len
        if key_end > length:
            break
        record = Record(payload[_HEADER.size:topic_end].decode(), payload[topic_end:key_end],
                        payload[key_end:])
        pos = body_start + length
        out.append((pos, record))
    return out, pos


class Spool:
    """Durable FIFO of records. One Spool per process; its folder is its own."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 16 * 1024 * 1024,
                 adopt: Sequence[Path] = ()) -> None:
        self.directory = directory
        # Folders of workers that no longer exist (the worker count went down):
        # their segments are replayed first, then deleted.
        self.adopt = tuple(adopt)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._segments: list[Path] = []          # oldest first; the last may be active
        self._active: Path | None = None
        self._active_fd: int | None = None
        self._active_size = 0
        self._pending_bytes = 0                  # bytes not yet drained (incl. buffered)
        self._pending_events = 0
        self._buffer: list[bytes] = []
        self._buffer_events = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._seq = 0

    # -- state -----------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_events(self) -> int:
        return self._pending_events

    @property
    def is_empty(self) -> bool:
        return self._pending_events == 0

    def open(self) -> None:
        """Find what a previous run left, so it is replayed first."""
        self.directory.mkdir(parents=True, exist_ok=True)
        own = sorted(self.directory.glob("seg-*.log"))
        adopted = [seg for folder in self.adopt for seg in sorted(folder.glob("seg-*.log"))]
        self._segments = adopted + own
        for seg in own:
            self._seq = max(self._seq, int(seg.stem.split("-")[1]))
        for seg in self._segments:
            data = seg.read_bytes()
            start = _read_cursor(seg)
            records, end = read_frames(data, start)
            if end < len(data):
                log.warning("spool segment has a torn tail; it was never acknowledged",
                            segment=seg.name, dropped_bytes=len(data) - end)
                with seg.open("r+b") as f:
                    f.truncate(end)
            self._pending_events += len(records)
            self._pending_bytes += end - start
        if self._pending_events:
            log.warning("spool holds events from an earlier run; replaying them first",
                        events=self._pending_events, bytes=self._pending_bytes)

    # -- appending ---------------------------------------------------------------

    async def append(self, records: list[Record]) -> None:
        """Return once ``records`` are on disk (fsync'd)."""
        frames = [r.frame() for r in records]
        size = sum(len(f) for f in frames)
        if self._pending_bytes + size > self.max_bytes:
            raise SpoolFull(f"spool is full ({self._pending_bytes} of {self.max_bytes} bytes)")
        self._pending_bytes += size
        self._pending_events += len(records)
        self._buffer.extend(frames)
        self._buffer_events += len(records)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="spool-flush")
        await waiter

    async def _flush_loop(self) -> None:
        while self._buffer:
            data, self._buffer = b"".join(self._buffer), []
            events, self._buffer_events = self._buffer_events, 0
            waiters, self._waiters = self._waiters, []
            try:
                async with self._lock:
                    fd = self._open_active()
                    try:
                        await asyncio.to_thread(_write_and_sync, fd, data)
                    except OSError:
                        # A partial frame (disk full, I/O error) must not stay in front of
                        # later, acknowledged frames: cut the segment back to its last good end.
                        os.ftruncate(fd, self._active_size)
                        raise
                    self._active_size += len(data)
                    if self._active_size >= self.segment_bytes:
                        self._close_active()
            except OSError as exc:
                log.exception("spool write failed; these requests are refused", events=events)
                self._pending_bytes -= len(data)
                self._pending_events -= events
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _open_active(self) -> int:
        if self._active_fd is None:
            self._seq += 1
            self._active = self.directory / f"seg-{self._seq:020d}.log"
            self._active_fd = os.open(self._active, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._active_size = 0
            self._segments.append(self._active)
            _fsync_dir(self.directory)
        return self._active_fd

    def _close_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
        self._active_fd = None
        self._active = None

    # -- draining ---------------------------------------------------------------

    async def drain(self, send: Callable[[list[Record]], Awaitable[None]], batch: int = 1000) -> int:
        """Send everything on disk in order, ``batch`` records at a time.

        ``send`` must raise if Kafka did not take the batch; draining then
        stops and the cursor stays before that batch. Returns records sent.
        """
        sent = 0
        while self._segments:
            seg = self._segments[0]
            data = await asyncio.to_thread(seg.read_bytes)
            start = _read_cursor(seg)
            records, _end = read_frames(data, start)
            for i in range(0, len(records), batch):
                chunk = records[i:i + batch]
                await send([r for _, r in chunk])
                new_cursor = chunk[-1][0]
                _write_cursor(seg, new_cursor)
                self._pending_bytes -= new_cursor - start
                self._pending_events -= len(chunk)
                start = new_cursor
                sent += len(chunk)
            async with self._lock:
                if seg == self._active:
                    if _file_size(seg) > start:
                        continue            # appended while we sent: read it again
                    self._close_active()
                if _file_size(seg) > start:
                    continue
                self._segments.pop(0)
                seg.unlink(missing_ok=True)
                _cursor_path(seg).unlink(missing_ok=True)
        return sent

    async def close(self) -> None:
        """Finish pending writes and close the active segment; safe to call twice."""
        if self._flusher is not None:
            with contextlib.suppress(OSError):
                await self._flusher
        async with self._lock:
            self._close_active()


def _write_and_sync(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _cursor_path(seg: Path) -> Path:
    return seg.with_suffix(".cursor")


def _read_cursor(seg: Path) -> int:
    try:
        return int(_cursor_path(seg).read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _write_cursor(seg: Path, offset: int) -> None:
    tmp = _cursor_path(seg).with_suffix(".cursor.tmp")
    tmp.write_text(str(offset))
    tmp.replace(_cursor_path(seg))
