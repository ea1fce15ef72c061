"""The KairosDB write format (POST /api/v1/datapoints): bounded decompression and the
validation of a body into rows for ExternalStore. Pure code; api.py runs it off the event
loop for large bodies.

A body is at most 16 MiB as sent and once decompressed (BodyTooLarge, a 413), holds at most
``write_max_points`` points, ``write_max_metrics`` metric names and ``write_max_tags`` tags per
metric (a 400, checked while parsing, so an oversized body stops early), and is refused whole
if one point is invalid.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from services.metrics import kairos
from services.metrics.errors import QueryError
from services.metrics.external import ExternalRow

# Bodies of POST /api/v1/datapoints from other producers, as sent and once decompressed.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Cassandra's largest TTL (20 years).
MAX_TTL_S = 630_720_000
# Tag names and values accepted by the write API.
_MAX_TAG_CHARS = 256


@dataclass(frozen=True)
class WriteLimits:
    points: int = 200_000
    metrics: int = 10_000
    tags: int = 64


def _bad_tags(tags: dict[str, Any]) -> str | None:
    return next(
        (
            k
            for k, v in tags.items()
            if not isinstance(v, str) or not k or not v or len(k) > _MAX_TAG_CHARS or len(v) > _MAX_TAG_CHARS
        ),
        None,
    )


def parse_datapoints(body: Any, limits: WriteLimits | None = None) -> list[ExternalRow]:  # noqa: C901 - one pass over a large body (see docstring)
    """Validate a KairosDB write body into (metric, ts, tags json, value, is_long, ttl) rows.

    Long because it is one pass over a body that may hold hundreds of thousands of points, and
    it stops at the first cap crossed instead of building the rest.
    """
    limits = limits or WriteLimits()
    metrics = body if isinstance(body, list) else [body]
    if len(metrics) > limits.metrics:
        raise QueryError(f"a write may hold at most {limits.metrics} metrics, this one has {len(metrics)}")
    errors: list[str] = []
    out: list[ExternalRow] = []
    names: set[str] = set()
    for i, metric in enumerate(metrics):
        if not isinstance(metric, dict):
            errors.append(f"metric[{i}] must be an object")
            continue
        name = metric.get("name")
        where = f"metric[{i}](name={name})"
        if not isinstance(name, str) or not name.strip():
            errors.append(f"metric[{i}].name may not be empty")
            continue
        if name in kairos.ROLLUP_METRICS:
            errors.append(f"{where}: {name} is written by the service itself")
            continue
        names.add(name)
        if len(names) > limits.metrics:
            raise QueryError(f"a write may name at most {limits.metrics} metrics")
        kind = metric.get("type")
        if kind is not None and kind not in ("long", "double", "number"):
            errors.append(f"{where}.type {kind!r} is not supported: only numbers are stored")
            continue
        tags = metric.get("tags")
        if not isinstance(tags, dict) or not tags:
            errors.append(f"{where}.tags count must be greater than or equal to 1")
            continue
        if len(tags) > limits.tags:
            errors.append(f"{where}.tags: at most {limits.tags} tags per metric")
            continue
        bad_tag = _bad_tags(tags)
        if bad_tag is not None:
            errors.append(f"{where}.tag[{bad_tag}] must be a non-empty string of at most {_MAX_TAG_CHARS} characters")
            continue
        tag_text = orjson.dumps(tags, option=orjson.OPT_SORT_KEYS).decode()
        ttl = metric.get("ttl")
        # KairosDB takes a TTL of 0 or below as none (the table's default applies).
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl > MAX_TTL_S):
            errors.append(f"{where}.ttl must be a whole number of seconds, at most {MAX_TTL_S}")
            continue
        ttl = ttl if ttl and ttl > 0 else None
        points = metric.get("datapoints")
        if points is None and "timestamp" in metric:
            points = [[metric.get("timestamp"), metric.get("value")]]
        if points is None:
            continue  # KairosDB accepts a metric without points, and stores nothing
        if not isinstance(points, list):
            errors.append(f"{where}.datapoints must be a list of [timestamp, value]")
            continue
        if len(out) + len(points) > limits.points:
            raise QueryError(f"a write may hold at most {limits.points} data points")
        for j, point in enumerate(points):
            if not isinstance(point, list) or len(point) != 2:
                errors.append(f"{where}.datapoints[{j}] must be [timestamp, value]")
                continue
            ts, value = point
            if isinstance(ts, str) and ts.strip().isdecimal():
                ts = int(ts)  # KairosDB reads a timestamp given as a string of digits
            if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= kairos.MAX_TIME_MS:
                errors.append(f"{where}.datapoints[{j}].timestamp must be ms since the epoch")
            elif (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (isinstance(value, float) and not math.isfinite(value))
            ):
                errors.append(f"{where}.datapoints[{j}].value must be a finite number")
            else:
                out.append((name, ts, tag_text, float(value), isinstance(value, int), ttl))
            if len(errors) > 100:
                raise QueryError(*errors, "(more errors not listed)")
    if errors:
        raise QueryError(*errors)
    return out


class BodyTooLarge(QueryError):
    """A body over MAX_BODY_BYTES, as sent or decompressed (a 413)."""


def gunzip(raw: bytes, limit: int = MAX_BODY_BYTES) -> bytes:
    """Decompress a gzip body (members in sequence) to at most ``limit`` bytes.

    Streaming with an output bound: a small compressed body may expand to gigabytes.
    """
    out: list[bytes] = []
    size = 0
    rest = raw
    while rest:
        inflater = zlib.decompressobj(31)
        try:
            chunk = inflater.decompress(rest, limit - size + 1)
        except zlib.error as exc:
            raise QueryError(f"the gzip body could not be read: {exc}") from None
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body is larger than {limit} bytes once decompressed")
        if not inflater.eof:
            raise QueryError("the gzip body could not be read: it ends before its last member")
        out.append(chunk)
        rest = inflater.unused_data
    return b"".join(out)


def decode(raw: bytes, gzipped: bool) -> Any:
    if gzipped:
        raw = gunzip(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise QueryError(f"the body is not JSON: {exc}") from None
