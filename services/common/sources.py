"""The source registry: who may send events, and what happens to them.

Ops edit one JSON file (``sources.json``, path is a setting); every service
reloads it live when it changes. A file that cannot be read or does not
validate is logged and the last good copy stays in force; ``status()``
reports that to /readyz.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.errors import ConfigError

log = structlog.get_logger(__name__)

_DEST_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,100}$")


class Enrichment(BaseModel):
    """Processor enrichment steps, each switchable per source."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_agent: bool = True
    geo: bool = True
    campaign: bool = True
    bot: bool = True
    ip: Literal["keep", "anonymize", "remove"] = "keep"


class Destination(BaseModel):
    """A routing rule: matching events are copied to ``dest.<name>``.

    ``types`` and ``events`` are allow-lists (absent: any). ``where`` maps a
    dotted path (``properties.plan``) to the value it must equal.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    types: tuple[str, ...] | None = None
    events: tuple[str, ...] | None = None
    where: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        if not _DEST_NAME.match(value):
            raise ValueError("destination names are lower-case letters, digits, '_', '.', '-'")
        return value


class Legacy(BaseModel):
    """How a source runs beside the legacy Kinesis path (services/bridge): ``bridge``
    copies its records from ``stream`` into events.raw, ``mirror`` copies its
    events.enriched events to ``stream``. A source runs one way on a stream (Source
    refuses both): bridged and mirrored at once, the legacy consumers would get its
    events twice. Different sources may run different ways on one stream: mirrored
    records carry a marker the bridge skips, so nothing goes round in a loop."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    direction: Literal["bridge", "mirror"]
    stream: str = Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_.-]+$")


class Source(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str
    write_key: str
    enabled: bool = True
    # Token bucket per source: sustained events per second and burst size; None = unlimited.
    rate_limit_per_s: float | None = None
    rate_limit_burst: int | None = None
    # Browser origins allowed by CORS; ["*"] allows any origin.
    allowed_origins: tuple[str, ...] = ("*",)
    enrichment: Enrichment = Enrichment()
    destinations: tuple[Destination, ...] = ()
    # Numeric properties the metrics service sums per event name (e.g. "revenue").
    sum_properties: tuple[str, ...] = ()
    # Device clock correction of the event time (proto/topics/events.enriched.md):
    # auto corrects client-side libraries only, correct every event, trust none.
    clock_skew: Literal["auto", "correct", "trust"] = "auto"
    # Beside the legacy Kinesis path (one object or a list of them): empty = not at all.
    legacy: tuple[Legacy, ...] = ()

    @field_validator("legacy", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("legacy")
    @classmethod
    def _one_way_per_stream(cls, legacy: tuple[Legacy, ...]) -> tuple[Legacy, ...]:
        streams = [entry.stream for entry in legacy]
        for stream in set(streams):
            if streams.count(stream) > 1:
                raise ValueError(
                    f"the legacy stream {stream!r} is named more than once; a source is "
                    "either bridged from a stream or mirrored to it, never both"
                )
        return legacy

    def legacy_way(self, stream: str) -> str | None:
        """ "bridge", "mirror" or None: how this source runs on that legacy stream."""
        return next((entry.direction for entry in self.legacy if entry.stream == stream), None)

    def legacy_streams(self, direction: str) -> list[str]:
        return [entry.stream for entry in self.legacy if entry.direction == direction]


class SourcesFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[Source, ...]

    @field_validator("sources")
    @classmethod
    def _unique(cls, sources: tuple[Source, ...]) -> tuple[Source, ...]:
        for attr in ("id", "write_key"):
            seen: set[str] = set()
            for s in sources:
                value = getattr(s, attr)
                if value in seen:
                    raise ValueError(
                        f"two sources share the {attr} {value!r}" if attr == "id" else "two sources share a write key"
                    )
                seen.add(value)
        return sources


def parse_sources(raw: bytes) -> SourcesFile:
    return SourcesFile.model_validate(orjson.loads(raw))


def describe_load_error(exc: OSError | ValueError) -> str:
    """Why the registry file is unusable, for logs and /readyz (a public port):
    where and what, never an entry's values. Pydantic's own text quotes the
    input (a whole entry, write key included), so it is rebuilt from the
    error list without inputs."""
    if isinstance(exc, ValidationError):
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        message = f"invalid sources file: {shown}"
    elif isinstance(exc, OSError):
        message = f"cannot read the sources file: {exc.strerror or type(exc).__name__}"
    elif isinstance(exc, orjson.JSONDecodeError):
        message = f"the sources file is not valid JSON: {exc}"  # orjson says where, not what
    else:
        message = f"invalid sources file: {type(exc).__name__}"
    return " ".join(message.split())


class SourceRegistry:
    """Lookups by write key or id, reloaded live from a file."""

    def __init__(self, path: Path, reload_interval_s: float = 2.0) -> None:
        self.path = path
        self.reload_interval_s = reload_interval_s
        self._by_key: dict[str, Source] = {}
        self._by_id: dict[str, Source] = {}
        self._mtime_ns: int | None = None
        self._error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> bool:
        """(Re)read the file if it changed. True when the registry changed."""
        try:
            stat = self.path.stat()
            if stat.st_mtime_ns == self._mtime_ns and self._error is None:
                return False
            parsed = parse_sources(self.path.read_bytes())
        except (OSError, ValueError, ValidationError) as exc:
            message = describe_load_error(exc)
            if message != self._error:
                log.warning(
                    "source registry unreadable; keeping the last good copy",
                    path=str(self.path),
                    error=message,
                    sources=len(self._by_id),
                )
            self._error = message
            return False
        self._mtime_ns = stat.st_mtime_ns
        self._error = None
        self._by_key = {s.write_key: s for s in parsed.sources}
        self._by_id = {s.id: s for s in parsed.sources}
        log.info("source registry loaded", path=str(self.path), sources=len(self._by_id))
        return True

    def by_write_key(self, key: str) -> Source | None:
        source = self._by_key.get(key)
        # Constant-time compare so timing does not leak how much of a key matched.
        if source is not None and hmac.compare_digest(source.write_key, key):
            return source
        return None

    def by_id(self, source_id: str) -> Source | None:
        return self._by_id.get(source_id)

    def sources(self) -> list[Source]:
        """Every registered source (enabled or not)."""
        return list(self._by_id.values())

    def write_keys(self) -> list[str]:
        """Every registered write key, for scrubbing them out of text that must not carry one."""
        return list(self._by_key)

    def origin_allowed_anywhere(self, origin: str) -> bool:
        """For CORS preflights, which carry no write key: does any enabled
        source accept this origin? The real request is checked per source."""
        return any(
            s.enabled and ("*" in s.allowed_origins or origin in s.allowed_origins) for s in self._by_id.values()
        )

    def __len__(self) -> int:
        return len(self._by_id)

    def status(self) -> tuple[bool, str]:
        """Ready while a good copy is loaded; an unreadable file is reported, not fatal."""
        if not self._by_id and self._error:
            return False, f"no sources loaded: {self._error}"
        if self._error:
            return True, f"serving the last good copy ({len(self)} sources): {self._error}"
        return True, f"{len(self)} sources"

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval_s)
            self.load()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SourceRegistry]:
        """Load now (a service must not start with no sources) and watch the file."""
        self.load()
        if not self._by_id:
            raise ConfigError(f"no sources could be loaded from {self.path}: {self._error}")
        self._task = asyncio.create_task(self._watch(), name="sources-watch")
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
