"""``headwater run`` starts the bridge and the mirror only for the directions sources ask for."""

from __future__ import annotations

from pathlib import Path

import orjson

from services.devstack import stack
from services.fleet import legacy_directions, legacy_members


def write_sources(root: Path, sources: list[dict[str, object]]) -> None:
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "sources.json").write_bytes(orjson.dumps({"sources": sources}))


def test_members_follow_the_sources(tmp_path: Path) -> None:
    settings = stack.StackSettings(data_dir=tmp_path / "stack")
    write_sources(tmp_path, [{"id": "a", "name": "a", "write_key": "ka"}])
    assert legacy_directions(tmp_path) == {}
    assert legacy_members(settings, tmp_path, {}) == []

    write_sources(
        tmp_path,
        [
            {"id": "a", "name": "a", "write_key": "ka", "legacy": {"direction": "bridge", "stream": "old"}},
            {"id": "b", "name": "b", "write_key": "kb", "legacy": {"direction": "mirror", "stream": "out"}},
        ],
    )
    directions = legacy_directions(tmp_path)
    assert directions == {"old": {"bridge"}, "out": {"mirror"}}
    members = {m.name: m for m in legacy_members(settings, tmp_path, directions)}
    assert set(members) == {"bridge", "mirror"}
    assert members["bridge"].args == ("bridge",) and members["mirror"].args == ("mirror",)
    assert members["bridge"].env["HEADWATER_BRIDGE_AWS_ENDPOINT_URL"] == settings.kinesis_endpoint
    assert members["mirror"].env["HEADWATER_BRIDGE_MIRROR_HTTP_PORT"] == str(members["mirror"].port)

    write_sources(
        tmp_path, [{"id": "a", "name": "a", "write_key": "ka", "legacy": {"direction": "bridge", "stream": "old"}}]
    )
    assert [m.name for m in legacy_members(settings, tmp_path, legacy_directions(tmp_path))] == ["bridge"]
