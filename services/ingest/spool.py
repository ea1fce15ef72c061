"""A local, fsync'd, append-only spool for events Kafka has not acknowledged.

Ingest answers 200 only once an event is in Kafka or in this spool. The
spool is a folder of segment files (their format, scans and cursor files:
spoolfile.py). Appends are group-committed: every
request waiting at the same moment shares one write and one fsync. A cursor
file per segment remembers how far draining got, so a restart resends at
most the batch that was in flight (a duplicate, never a loss).

Invariants:

- **The drainer reads only up to the durable end.** The flusher records a
  segment's durable end after each fsync (under the spool lock); the drainer
  never looks past it. Bytes past it may still be written, or cut back by
  a failed write (disk full, EIO), so a cursor never points past them and
  no later acknowledged frame can land under a cursor.
- **A failed write leaves no partial frame in front of later frames.** The
  segment is cut back to its durable end; if even that fails the segment is
  closed and the next write opens a new one.
- **A torn tail is dropped only when it cannot hold an acknowledged frame.**
  On reopen, bytes after the last good frame are cut only when they are a
  frame that never finished arriving (shorter than it declares, or zeros)
  with no whole frame anywhere after it: the one unacknowledged write a
  crash interrupted. (The durable end itself is not persisted, which would
  cost a second fsync per write; a damaged length field in the very last
  frame of a segment therefore looks torn and is cut, the one case where
  damage goes unreported.)
- **Damage is never cut silently.** A frame before the durable end that
  fails its CRC (bit rot, a bad disk) makes the segment *damaged*: frames
  around it that still frame correctly are delivered, and the file is set
  aside in ``damaged/`` with a ``.damage.json`` report for an operator
  (``headwater spool inspect|replay``). The drainer logs an error, the
  ``headwater_ingest_spool_damaged_segments`` gauge and /readyz say so, and
  draining backs off before it moves on to the next segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import orjson
import structlog

from services.common.kafkawriter import OutRecord
from services.ingest.errors import SpoolDamaged, SpoolFull
from services.ingest.spoolfile import (
    DamagedSegment,
    Scan,
    cursor_path,
    frame,
    fsync_dir,
    is_torn_tail,
    move_aside,
    read_cursor,
    read_frames,
    read_range,
    read_report,
    scan_frames,
    write_cursor,
)

log = structlog.get_logger(__name__)

DAMAGED_DIR = "damaged"


class Spool:
    """Durable FIFO of records. One Spool per process; its folder is its own."""

    def __init__(
        self, directory: Path, max_bytes: int, segment_bytes: int = 16 * 1024 * 1024, adopt: Sequence[Path] = ()
    ) -> None:
        self.directory = directory
        # Folders of workers that no longer exist (the worker count went down):
        # their segments are replayed first, then deleted.
        self.adopt = tuple(adopt)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._segments: list[Path] = []  # oldest first; the last may be active
        self._durable: dict[Path, int] = {}  # segment -> end of its fsync'd frames
        self._events: dict[Path, int] = {}  # segment -> events not yet drained
        self._active: Path | None = None
        self._active_fd: int | None = None
        self._pending_bytes = 0  # bytes not yet drained (incl. buffered)
        self._pending_events = 0
        self._buffer: list[bytes] = []
        self._buffer_events = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._seq = 0
        self.damaged: list[DamagedSegment] = []

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

    @property
    def damaged_dir(self) -> Path:
        return self.directory / DAMAGED_DIR

    def refresh_damaged(self) -> None:
        """Re-read damaged/ (blocking; call in a thread): an operator's replay
        moves files out of it."""
        self.damaged = [read_report(p) for p in sorted(self.damaged_dir.glob("seg-*.log"))]

    def durable_end(self, segment: Path) -> int:
        """Where the fsync'd frames of ``segment`` end (0 for an unknown one)."""
        return self._durable.get(segment, 0)

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
            start = min(read_cursor(seg), len(data))
            _, good_end = read_frames(data, start)
            if good_end < len(data) and is_torn_tail(data, good_end):
                log.warning(
                    "spool segment has a torn tail; it was never acknowledged",
                    segment=seg.name,
                    dropped_bytes=len(data) - good_end,
                )
                with seg.open("r+b") as f:
                    f.truncate(good_end)
                data = data[:good_end]
            # Anything else that does not frame is damage: left in place, inside the
            # durable end, for the drainer to find and set aside (never cut here).
            self._durable[seg] = len(data)
            events = len(scan_frames(data, start, len(data)).records)
            self._events[seg] = events
            self._pending_events += events
            self._pending_bytes += len(data) - start
        self.refresh_damaged()
        if self._pending_events:
            log.warning(
                "spool holds events from an earlier run; replaying them first",
                events=self._pending_events,
                bytes=self._pending_bytes,
            )
        if self.damaged:
            log.error(
                "spool holds damaged segments set aside earlier; inspect them with 'headwater spool inspect'",
                segments=[str(d.path) for d in self.damaged],
            )

    # -- appending ---------------------------------------------------------------

    async def append(self, records: list[OutRecord]) -> None:
        """Return once ``records`` are on disk (fsync'd)."""
        frames = [frame(r) for r in records]
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
                    await self._write(data, events)
            except OSError as exc:
                log.warning("spool write failed; these requests are refused", events=events, error=repr(exc))
                self._pending_bytes -= len(data)
                self._pending_events -= events
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _write(self, data: bytes, events: int) -> None:
        """Write and fsync one group under the lock; then move the durable end."""
        fd = self._open_active()
        seg = self._active
        assert seg is not None
        durable = self._durable[seg]
        try:
            await asyncio.to_thread(_write_and_sync, fd, data)
        except OSError:
            # A partial frame (disk full, I/O error) must not stay in front of later,
            # acknowledged frames: cut the segment back to its durable end. If that
            # fails too, appends (O_APPEND) would land after the partial frame: close
            # the segment, so the next write starts a new one.
            try:
                os.ftruncate(fd, durable)
            except OSError:
                log.exception("spool segment could not be cut back; closing it", segment=seg.name)
                self._close_active()
            raise
        self._durable[seg] = durable + len(data)
        self._events[seg] = self._events.get(seg, 0) + events
        if self._durable[seg] >= self.segment_bytes:
            self._close_active()

    def _open_active(self) -> int:
        if self._active_fd is None:
            self._seq += 1
            active = self.directory / f"seg-{self._seq:020d}.log"
            self._active_fd = os.open(active, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._active = active
            self._durable[active] = 0
            self._events[active] = 0
            self._segments.append(active)
            fsync_dir(self.directory)
        return self._active_fd

    def _close_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
        self._active_fd = None
        self._active = None

    # -- draining ---------------------------------------------------------------

    async def drain(self, send: Callable[[list[OutRecord]], Awaitable[None]], batch: int = 1000) -> int:
        """Send everything durable in order, ``batch`` records at a time.

        ``send`` must raise if Kafka did not take the batch; draining then
        stops and the cursor stays before that batch. Returns records sent.
        Raises SpoolDamaged after setting a damaged segment aside (its good
        frames sent first); the caller backs off and drains again.
        """
        sent = 0
        while self._segments:
            seg = self._segments[0]
            durable = self._durable.get(seg, 0)
            start = read_cursor(seg)
            if start > durable:
                await self._set_aside(seg, Scan(damaged=[(durable, start)], end=durable))
                raise SpoolDamaged(f"spool segment {seg.name}: cursor {start} past its durable end {durable}")
            scan = Scan(end=start)
            if start < durable:
                data = await asyncio.to_thread(read_range, seg, start, durable)
                scan = scan_frames(data, 0, len(data), base=start)
                if start + len(data) < durable:
                    # Shorter than its durable end (cut from outside, a bad disk):
                    # what is missing is damage too, never a silent loss.
                    scan.damaged.append((start + len(data), durable))
                    scan.end = durable
            sent += await self._send_scanned(seg, scan, start, send, batch)
            if scan.damaged:
                await self._set_aside(seg, scan)
                raise SpoolDamaged(f"spool segment {seg.name} is damaged at {scan.damaged}; set aside")
            async with self._lock:
                # Under the lock no write is in flight: a durable end equal to the
                # cursor means this segment holds nothing more to send.
                if self._durable.get(seg, 0) > scan.end:
                    continue  # appended while we sent: read the new part
                if seg == self._active:
                    self._close_active()
                self._forget(seg)
                seg.unlink(missing_ok=True)
                cursor_path(seg).unlink(missing_ok=True)
        return sent

    async def _send_scanned(
        self, seg: Path, scan: Scan, start: int, send: Callable[[list[OutRecord]], Awaitable[None]], batch: int
    ) -> int:
        records = scan.records
        for i in range(0, len(records), batch):
            chunk = records[i : i + batch]
            await send([r for _, r in chunk])
            new_cursor = chunk[-1][0]
            write_cursor(seg, new_cursor)
            self._pending_bytes -= new_cursor - start
            self._pending_events -= len(chunk)
            self._events[seg] = self._events.get(seg, 0) - len(chunk)
            start = new_cursor
        if scan.end > start:
            write_cursor(seg, scan.end)  # past a damaged range at the end
            self._pending_bytes -= scan.end - start
        return len(records)

    async def _set_aside(self, seg: Path, scan: Scan) -> None:
        """Move a damaged segment to damaged/ with a report; it leaves the queue."""
        async with self._lock:
            if seg == self._active:
                self._close_active()
            durable = self._durable.get(seg, 0)
            report = {
                "segment": seg.name,
                "from": str(seg.parent),
                "durable_end": durable,
                "damaged": scan.damaged,
                "delivered_up_to": scan.end,
                "set_aside_at": time.time(),
            }
            target = await asyncio.to_thread(move_aside, seg, self.damaged_dir, orjson.dumps(report))
            lost_events = self._events.get(seg, 0)
            self._pending_events -= max(lost_events, 0)
            self._forget(seg)
            self.damaged.append(DamagedSegment(target, tuple(scan.damaged), durable))
        log.error(
            "spool segment damaged: frames failing their CRC before the durable end; "
            "the good frames were sent and the file set aside for an operator",
            segment=seg.name,
            damaged_ranges=scan.damaged,
            set_aside=str(target),
            hint="headwater spool inspect " + str(target),
        )

    def _forget(self, seg: Path) -> None:
        self._segments.remove(seg)
        self._durable.pop(seg, None)
        self._events.pop(seg, None)

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
