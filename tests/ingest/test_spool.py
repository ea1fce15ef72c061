"""The spool keeps order, survives reopening and drops only torn tails (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.ingest.errors import SpoolFull
from services.ingest.spool import Record, Spool, read_frames


def rec(i: int) -> Record:
    return Record("events.raw", f"k{i}".encode(), f"value-{i}".encode() * 3)


async def test_append_then_drain_in_order_across_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=500)
    for i in range(0, 100, 10):
        await spool.append([rec(j) for j in range(i, i + 10)])
    assert spool.pending_events == 100
    assert len(list(tmp_path.glob("seg-*.log"))) > 1
    got: list[Record] = []

    async def send(batch: list[Record]) -> None:
        got.extend(batch)

    assert await spool.drain(send, batch=7) == 100
    assert got == [rec(i) for i in range(100)]
    assert spool.is_empty and spool.pending_bytes == 0
    assert not list(tmp_path.glob("seg-*"))


async def test_failed_send_keeps_the_cursor_and_reopen_replays_the_rest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    await spool.append([rec(i) for i in range(20)])
    got: list[Record] = []

    async def flaky(batch: list[Record]) -> None:
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
    rest: list[Record] = []

    async def send(batch: list[Record]) -> None:
        rest.extend(batch)

    await reopened.drain(send)
    assert got + rest == [rec(i) for i in range(20)]


async def test_torn_tail_is_dropped_on_open(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    await spool.append([rec(1), rec(2)])
    await spool.close()
    [segment] = tmp_path.glob("seg-*.log")
    with segment.open("ab") as f:
        f.write(rec(3).frame()[:-4])  # a crash in the middle of a write
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
    good = rec(1).frame()
    bad = bytearray(rec(2).frame())
    bad[-1] ^= 0xFF
    records, end = read_frames(good + bytes(bad) + rec(3).frame())
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
    await spool.append([rec(3)])                      # acknowledged after the failure
    assert spool.pending_events == 2
    await spool.close()

    reopened = Spool(tmp_path, max_bytes=10_000_000)
    reopened.open()
    got: list[Record] = []

    async def send(batch: list[Record]) -> None:
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
    got: list[Record] = []

    async def send(batch: list[Record]) -> None:
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
