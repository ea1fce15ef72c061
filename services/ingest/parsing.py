"""Turning HTTP requests into stamped Segment events: pure functions, no I/O.

Kept apart from the handlers so the rules (limits, write keys, stamps,
trusted proxies) are tested fast and property-tested with hypothesis.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import itertools
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from services.common import segment


class RequestError(Exception):
    """The request cannot be taken; ``status`` and ``body`` are the answer."""

    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"success": False, "error": error, "message": message, **extra}
        self.headers: dict[str, str] = {}
        self.close_connection = False  # answer, then close (a client too slow to finish)


def too_large(limit_name: str, limit: int, what: str) -> RequestError:
    return RequestError(
        413,
        "payload_too_large",
        f"{what} is larger than {limit_name} ({limit} bytes)",
        limit=limit_name,
        limit_bytes=limit,
    )


class BoundedDecoder:
    """Decodes a request body as it streams in, refusing it as soon as the
    decoded size passes ``limit``: a gzip bomb is stopped after ``limit``
    bytes of output, never inflated whole."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._parts: list[bytes] = []
        encoding = encoding.strip().lower()
        self._raw_deflate_fallback = False
        self._decomp: Any
        if encoding in ("", "identity"):
            self._decomp = None
        elif encoding in ("gzip", "x-gzip"):
            self._decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            # "deflate" is zlib-wrapped by the RFC, but some clients send raw deflate.
            self._decomp = zlib.decompressobj(zlib.MAX_WBITS)
            self._raw_deflate_fallback = True
        else:
            raise RequestError(
                415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported (use gzip or deflate)"
            )
        self._first = True

    def _take(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise too_large("max_request_bytes", self.limit, "the decoded request body")
        self._parts.append(data)

    def feed(self, chunk: bytes) -> None:
        if self._decomp is None:
            self._take(chunk)
            return
        try:
            data = self._decomp.decompress(chunk, self.limit - self.size + 1)
        except zlib.error as exc:
            if self._first and self._raw_deflate_fallback:
                self._decomp = zlib.decompressobj(-zlib.MAX_WBITS)
                self._raw_deflate_fallback = False
                self.feed(chunk)
                return
            raise RequestError(400, "bad_encoding", f"the body could not be decompressed: {exc}") from None
        self._first = False
        self._take(data)
        # Output was capped: keep draining the unconsumed input within the limit.
        while self._decomp.unconsumed_tail:
            data = self._decomp.decompress(self._decomp.unconsumed_tail, self.limit - self.size + 1)
            if not data:
                break
            self._take(data)

    def finish(self) -> bytes:
        if self._decomp is not None:
            try:
                self._take(self._decomp.flush())
            except zlib.error as exc:
                raise RequestError(400, "bad_encoding", f"the body could not be decompressed: {exc}") from None
            if not self._decomp.eof and self.size:
                raise RequestError(400, "bad_encoding", "the compressed body is truncated")
        return b"".join(self._parts)


# orjson reads JSON nested up to 1,024 levels (deeper is a decode error) but
# writes at most 254: an event deeper than that cannot be forwarded.
JSON_READ_MAX_DEPTH = 1024
JSON_MAX_DEPTH = 254


def parse_json_body(body: bytes) -> dict[str, Any]:
    if not body or body.isspace():  # not strip(): that copies the whole body
        raise RequestError(400, "invalid_json", "the request body is empty")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise RequestError(
                400,
                "invalid_json",
                f"the body is nested deeper than {JSON_READ_MAX_DEPTH} levels; events may nest "
                f"at most {JSON_MAX_DEPTH}",
            ) from None
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "invalid_json", f"the body must be a JSON object, got {type(data).__name__}")
    return data


def cut_deep(value: Any, max_depth: int, marker: str) -> Any:
    """A copy of a JSON value with every container deeper than ``max_depth``
    replaced by ``marker``. Iterative, so no depth can exhaust the stack."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, int]] = [(value, root, 0, 0)]  # (value, parent, slot, depth)
    while stack:
        item, parent, slot, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= max_depth:
                parent[slot] = marker
                continue
            copy: dict[Any, Any] = {}
            parent[slot] = copy
            stack.extend((v, copy, k, depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            if depth >= max_depth:
                parent[slot] = marker
                continue
            items: list[Any] = [None] * len(item)
            parent[slot] = items
            stack.extend((v, items, i, depth + 1) for i, v in enumerate(item))
        else:
            parent[slot] = item
    return root[0]


def scrub_keys(data: bytes, keys: Sequence[str], mask: bytes = b"[write key removed]") -> bytes:
    """``data`` with every write key in it (raw, and as JSON writes it) replaced:
    for bad rows, whose originals and errors are client input that may carry one."""
    for key in keys:
        if not key:
            continue
        raw = key.encode("utf-8", "surrogateescape")
        if raw in data:
            data = data.replace(raw, mask)
        escaped = orjson.dumps(key)[1:-1]
        if escaped != raw and escaped in data:
            data = data.replace(escaped, mask)
    return data


def write_key_from_basic(header: str | None) -> str | None:
    """``Basic base64("<writeKey>:")``; the trailing colon is optional."""
    if not header:
        return None
    return _basic_user(header)


@functools.lru_cache(maxsize=1024)
def _basic_user(header: str) -> str | None:
    # Cached: an SDK sends the same header with every request.
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise RequestError(401, "bad_authorization", "the Authorization header is not valid Basic base64") from None
    user, _, _password = decoded.partition(":")
    return user or None


def find_write_key(auth_header: str | None, query_key: str | None, body: dict[str, Any] | None) -> str:
    key = write_key_from_basic(auth_header) or query_key
    if not key and body is not None:
        body_key = body.get("writeKey")
        key = body_key if isinstance(body_key, str) else None
    if not key:
        raise RequestError(
            401,
            "missing_write_key",
            "no write key: send HTTP Basic auth with the write key as user name, "
            "a writeKey field in the body, or ?writeKey=",
        )
    return key


@dataclass(frozen=True)
class TrustedProxies:
    """Networks whose X-Forwarded-For we believe."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, cidrs: Sequence[str]) -> TrustedProxies:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs))

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str:
        """The peer, or behind trusted proxies the right-most untrusted XFF hop."""
        ip = peer or ""
        if not forwarded_for or not self.networks or not self.trusts(ip):
            return ip
        for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
            ip = hop
            if not self.trusts(hop):
                break
        return ip


class UniqueIds:
    """``<prefix><96 random bits>-<counter>``: unique without a system call per id.
    The random part is drawn again in a forked child, so processes never share it."""

    def __init__(self, prefix: str) -> None:
        self._base = prefix
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self._prefix = f"{self._base}{os.urandom(12).hex()}-"
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


# Stamped on events that come without a messageId, and on requests without X-Request-Id.
new_message_id = UniqueIds("hw-")
new_request_id = UniqueIds("")

_second: list[Any] = [-1, ""]  # the last Unix second formatted, and its text


def iso_ms(ms: int) -> str:
    """Unix milliseconds as ISO-8601 UTC with milliseconds. Every request needs
    one: the date and time of day are formatted once per second, not per call."""
    sec, milli = divmod(ms, 1000)
    if sec != _second[0]:
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        _second[0] = sec
    return f"{_second[1]}{milli:03d}Z"


def iso_now_ms(now: datetime | None = None) -> str:
    """ISO-8601 UTC with milliseconds, for now or for ``now``."""
    if now is None:
        return iso_ms(time.time_ns() // 1_000_000)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def stamp(
    event: dict[str, Any],
    *,
    received_at: str,
    client_ip: str,
    batch_context: dict[str, Any] | None,
    batch_integrations: dict[str, Any] | None,
    batch_sent_at: Any,
) -> dict[str, Any]:
    """Add the server's stamps in place. Client times stay as sent: the
    processor corrects them."""
    event.pop("writeKey", None)  # a credential never travels downstream
    event["receivedAt"] = received_at
    if not segment.present(event.get("messageId")):
        event["messageId"] = new_message_id()
    if batch_sent_at is not None and "sentAt" not in event:
        event["sentAt"] = batch_sent_at
    context = event.get("context")
    if not isinstance(context, dict):
        context = {}
    if batch_context:
        context = {**batch_context, **context}
    if client_ip and not context.get("ip"):
        context["ip"] = client_ip
    event["context"] = context
    if batch_integrations:
        integrations = event.get("integrations")
        if not isinstance(integrations, dict):
            integrations = {}
        event["integrations"] = {**batch_integrations, **integrations}
    return event


def decode_pixel_data(data: str) -> bytes | None:
    """A pixel's ``data=``: base64, standard or URL-safe, padding optional; None if not."""
    padded = data.strip() + "=" * (-len(data.strip()) % 4)
    try:
        return base64.b64decode(padded, altchars=b"-_" if ("-" in padded or "_" in padded) else None, validate=True)
    except (binascii.Error, ValueError):
        return None


def decode_pixel(query: dict[str, str], pixel_type: str) -> dict[str, Any]:
    """A tracking pixel's event: ``?data=<base64 JSON>`` or plain query fields."""
    data = query.get("data")
    if data is not None:
        raw = decode_pixel_data(data)
        if raw is None:
            raise RequestError(400, "bad_pixel", "data= is not valid base64")
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RequestError(400, "bad_pixel", "data= does not decode to JSON") from None
        if not isinstance(event, dict):
            raise RequestError(400, "bad_pixel", "data= must decode to a JSON object")
    else:
        event = {k: v for k, v in query.items() if k not in ("writeKey",)}
        props = {k[len("properties.") :]: v for k, v in event.items() if k.startswith("properties.")}
        event = {k: v for k, v in event.items() if not k.startswith("properties.")}
        if props:
            event["properties"] = props
    event.setdefault("type", pixel_type)
    return event
