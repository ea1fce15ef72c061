"""The spool keeps order, survives reopening and drops only torn tails (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.kafkawriter import OutRecord
from services.ingest.errors import SpoolFull
from services.ingest.spool import Spool
from services.ingest.spoolfile import frame, read_frames


def rec(i: int) -> OutRecord:
    return OutRecord("events.raw", f"k{i}".encode(), f"value-{i}".encode() * 3)


async def test_append_then_drain_in_order_across_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=500)
    for i in range(0, 100, 10):
        await spool.append([rec(j) for j in range(i, i + 10)])
    assert spool.pending_events == 100
    assert len(list(tmp_path.glob("seg-*.log"))) > 1
    got: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        got.extend(batch)

    assert await spool.drain(send, batch=7) == 100
    assert got == [rec(i) for i in range(100)]
    assert spool.is_empty and spool.pending_bytes == 0
    assert not list(tmp_path.glob("seg-*"))


async def test_failed_send_keeps_the_cursor_and_reopen_replays_the_rest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    await spool.append([rec(i) for i in range(20)])
    got: list[OutRecord] = []

    async def flaky(batch: list[OutRecord]) -> None:
        if len(got) >= 10:
            raise OSError("kafka went away")
        got.extend(batch)

    with pytest.raises(OSError, match="kafka went away"):
        await spool.drain(flaky, batch=5)
    assert spool.pending_events == 10
    await spool.close()

    reopened = Spool(tmp_path, max_bytes=10_000_000)
    reopened.open()
    assert reopened.pending_events == 10
    rest: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        rest.extend(batch)

    await reopened.drain(send)
    assert got + rest == [rec(i) for i in range(20)]


async def test_torn_tail_is_dropped_on_open(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    await spool.append([rec(1), rec(2)])
    await spool.close()
    [segment] = tmp_path.glob("seg-*.log")
    with segment.open("ab") as f:
        f.write(frame(rec(3))[:-4])  # a crash in the middle of a write
    reopened = Spool(tmp_path, max_bytes=10_000_000)
    reopened.open()
    assert reopened.pending_events == 2
    records, _ = read_frames(segment.read_bytes())
    assert [r for _, r in records] == [rec(1), rec(2)]


async def test_full_spool_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=200)
    await spool.append([rec(1)])
    with pytest.raises(SpoolFull):
        await spool.append([rec(i) for i in range(10)])
    assert spool.pending_events == 1


def test_corrupt_crc_stops_the_scan() -> None:
    good = frame(rec(1))
    bad = bytearray(frame(rec(2)))
    bad[-1] ^= 0xFF
    records, end = read_frames(good + bytes(bad) + frame(rec(3)))
    assert [r for _, r in records] == [rec(1)] and end == len(good)


async def test_failed_write_is_cut_back_and_later_acks_survive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from services.ingest import spool as spool_module

    spool = Spool(tmp_path, max_bytes=10_000_000)
    await spool.append([rec(1)])
    real = spool_module._write_and_sync

    def half_then_fail(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])  # disk full half-way through a frame
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_and_sync", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        await spool.append([rec(2)])
    monkeypatch.setattr(spool_module, "_write_and_sync", real)
    await spool.append([rec(3)])  # acknowledged after the failure
    assert spool.pending_events == 2
    await spool.close()

    reopened = Spool(tmp_path, max_bytes=10_000_000)
    reopened.open()
    got: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        got.extend(batch)

    await reopened.drain(send)
    assert got == [rec(1), rec(3)]


async def test_spools_of_retired_workers_are_adopted_and_replayed_first(tmp_path: Path) -> None:
    old = Spool(tmp_path / "worker-3", max_bytes=10_000_000)
    old.open()
    await old.append([rec(1), rec(2)])
    await old.close()
    spool = Spool(tmp_path / "worker-1", max_bytes=10_000_000, adopt=[tmp_path / "worker-3"])
    spool.open()
    await spool.append([rec(3)])
    got: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        got.extend(batch)

    await spool.drain(send)
    assert got == [rec(1), rec(2), rec(3)]
    assert not list((tmp_path / "worker-3").glob("seg-*"))


def test_orphan_spool_folders_go_to_one_worker_each(tmp_path: Path) -> None:
    from services.ingest.app import orphan_spools
    from services.ingest.settings import Settings

    for i in range(6):
        (tmp_path / f"worker-{i}").mkdir()
    settings = Settings(spool_dir=tmp_path, workers=2)
    assert [p.name for p in orphan_spools(settings, 0)] == ["worker-2", "worker-4"]
    assert [p.name for p in orphan_spools(settings, 1)] == ["worker-3", "worker-5"]


async def _drain_all(spool: Spool) -> list[OutRecord]:
    got: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        got.extend(batch)

    await spool.drain(send)
    return got


async def test_drainer_never_reads_past_the_durable_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that reached the file but whose fsync failed is cut back; a drain
    running meanwhile must not send it or move its cursor past it."""
    import asyncio
    import os
    import threading

    from services.ingest import spool as spool_module

    spool = Spool(tmp_path, max_bytes=10_000_000)
    await spool.append([rec(1)])
    written, release = threading.Event(), threading.Event()

    def write_then_fail_fsync(fd: int, data: bytes) -> None:
        os.write(fd, data)  # in the file (page cache), not yet durable
        written.set()
        release.wait(10)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "_write_and_sync", write_then_fail_fsync)
    failing = asyncio.create_task(spool.append([rec(2), rec(3)]))
    await asyncio.to_thread(written.wait, 10)
    [segment] = tmp_path.glob("seg-*.log")
    assert segment.stat().st_size > spool.durable_end(segment)  # the frames are there, not durable

    sent: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        sent.extend(batch)

    drainer = asyncio.create_task(spool.drain(send))
    await asyncio.sleep(0.2)
    assert sent == [rec(1)]  # nothing past the durable end
    release.set()
    with pytest.raises(OSError, match="Input/output"):
        await failing
    await drainer
    monkeypatch.undo()
    await spool.append([rec(4)])  # acknowledged after the failure
    assert await _drain_all(spool) == [rec(4)]
    assert sent == [rec(1)] and spool.is_empty


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


async def test_flipped_payload_byte_sets_the_segment_aside_and_the_rest_is_delivered(tmp_path: Path) -> None:
    from services.ingest.errors import SpoolDamaged

    spool = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=200)
    for i in range(12):
        await spool.append([rec(i)])
    await spool.close()
    segments = sorted(tmp_path.glob("seg-*.log"))
    assert len(segments) >= 3
    frames_first, _ = read_frames(segments[0].read_bytes())
    in_first = [r for _, r in frames_first]
    assert len(in_first) >= 3
    second_frame_start = frames_first[0][0]
    _flip(segments[0], second_frame_start + 20)  # inside the second frame's payload

    reopened = Spool(tmp_path, max_bytes=10_000_000)
    reopened.open()  # not a torn tail: nothing is cut
    assert segments[0].stat().st_size == len(b"".join(frame(r) for r in in_first))
    got: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        got.extend(batch)

    with pytest.raises(SpoolDamaged):
        await reopened.drain(send)
    # The frames around the damaged one were sent; the file is kept with a report.
    assert got == [in_first[0], *in_first[2:]]
    kept = tmp_path / "damaged" / segments[0].name
    assert kept.exists() and kept.with_suffix(".damage.json").exists()
    assert [d.path for d in reopened.damaged] == [kept]
    await reopened.drain(send)  # the next round moves on
    assert got == [r for r in (rec(i) for i in range(12)) if r != in_first[1]]
    assert reopened.is_empty and reopened.pending_bytes == 0

    again = Spool(tmp_path, max_bytes=10_000_000)
    again.open()  # still reported after a restart
    assert [d.path for d in again.damaged] == [kept] and again.is_empty


async def test_flipped_length_byte_loses_framing_and_keeps_the_rest_for_the_operator(tmp_path: Path) -> None:
    from services.ingest.errors import SpoolDamaged
    from services.ingest.spoolfile import resync_frames

    spool = Spool(tmp_path, max_bytes=10_000_000)
    spool.open()
    await spool.append([rec(i) for i in range(6)])
    [segment] = tmp_path.glob("seg-*.log")
    frames, _ = read_frames(segment.read_bytes())
    _flip(segment, frames[1][0] + 1)  # the third frame's length field
    got: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        got.extend(batch)

    # The segment is still the active one: a live drain finds the damage too.
    with pytest.raises(SpoolDamaged):
        await spool.drain(send)
    assert got == [rec(0), rec(1)]
    [damage] = spool.damaged
    assert damage.damaged == ((frames[1][0], frames[-1][0]),)
    data = damage.path.read_bytes()
    recovered = [r for _, r in resync_frames(data, frames[1][0], len(data))]
    assert recovered == [rec(3), rec(4), rec(5)]
    await spool.append([rec(9)])  # appends go to a new segment
    assert await _drain_all(spool) == [rec(9)]


async def test_a_damaged_last_frame_is_not_taken_for_a_torn_tail(tmp_path: Path) -> None:
    from services.ingest.errors import SpoolDamaged

    spool = Spool(tmp_path, max_bytes=10_000_000)
    await spool.append([rec(1), rec(2)])
    await spool.close()
    [segment] = tmp_path.glob("seg-*.log")
    _flip(segment, segment.stat().st_size - 2)
    reopened = Spool(tmp_path, max_bytes=10_000_000)
    reopened.open()
    got: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        got.extend(batch)

    with pytest.raises(SpoolDamaged):
        await reopened.drain(send)
    assert got == [rec(1)]
    assert (tmp_path / "damaged" / segment.name).exists()


async def test_a_damaged_length_in_front_of_good_frames_is_not_taken_for_a_torn_tail(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    await spool.append([rec(i) for i in range(4)])
    await spool.close()
    [segment] = tmp_path.glob("seg-*.log")
    size = segment.stat().st_size
    frames, _ = read_frames(segment.read_bytes())
    _flip(segment, frames[0][0] + 2)  # frame 2 now declares 16 KiB more than the file holds
    reopened = Spool(tmp_path, max_bytes=10_000_000)
    reopened.open()
    assert segment.stat().st_size == size  # nothing cut


async def test_a_segment_cut_below_its_durable_end_is_set_aside(tmp_path: Path) -> None:
    from services.ingest.errors import SpoolDamaged

    spool = Spool(tmp_path, max_bytes=10_000_000)
    spool.open()
    await spool.append([rec(i) for i in range(4)])
    [segment] = tmp_path.glob("seg-*.log")
    frames, _ = read_frames(segment.read_bytes())
    with segment.open("r+b") as f:
        f.truncate(frames[1][0] + 5)  # cut from outside, mid-frame
    got: list[OutRecord] = []

    async def send(batch: list[OutRecord]) -> None:
        got.extend(batch)

    with pytest.raises(SpoolDamaged):
        await spool.drain(send)
    assert got == [rec(0), rec(1)]
    assert (tmp_path / "damaged" / segment.name).exists() and spool.is_empty
