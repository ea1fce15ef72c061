"""The Segment tracking spec: event types and the checks every event must pass.

Used by ingest (to answer the client) and by the processor (events.raw can
also be written by other producers, such as the legacy bridge).
"""

from __future__ import annotations

from typing import Any

# Long and short names (analytics.js posts to /v1/t, /v1/p, ...).
TYPES = ("track", "identify", "page", "screen", "group", "alias")
SHORT_TYPES = {"t": "track", "i": "identify", "p": "page", "s": "screen", "g": "group", "a": "alias"}

MESSAGE_ID_MAX = 100
_ID_TYPES = (str, int, float)


def present(value: Any) -> bool:
    """Segment SDKs send ``null`` (and some send "") for an absent id."""
    return value is not None and value != ""


def user_key(event: dict[str, Any]) -> str:
    """The id that keeps one user's events in order: userId, else anonymousId."""
    uid = event.get("userId")
    if present(uid):
        return str(uid)
    anon = event.get("anonymousId")
    return str(anon) if present(anon) else ""


def validate(event: Any, expected_type: str | None = None) -> list[str]:
    """Return what is wrong with ``event`` against the spec (empty when valid).

    ``expected_type`` is the type implied by the path (/v1/track); an event
    with no "type" takes it, one with another type is an error.
    """
    if not isinstance(event, dict):
        return [f"event must be a JSON object, got {type(event).__name__}"]
    errors: list[str] = []
    etype = event.get("type", expected_type)
    if expected_type and etype != expected_type:
        errors.append(f"type {etype!r} does not match the path's type {expected_type!r}")
    if etype not in TYPES:
        errors.append(f"type must be one of {', '.join(TYPES)}; got {etype!r}")
    for key in ("userId", "anonymousId"):
        value = event.get(key)
        if present(value) and not isinstance(value, _ID_TYPES):
            errors.append(f"{key} must be a string or a number")
    if not (present(event.get("userId")) or present(event.get("anonymousId"))):
        errors.append("userId or anonymousId is required")
    if etype == "track":
        name = event.get("event")
        if not isinstance(name, str) or not name:
            errors.append("track needs a non-empty string 'event'")
    elif etype == "group" and not present(event.get("groupId")):
        errors.append("group needs 'groupId'")
    elif etype == "alias" and not present(event.get("previousId")):
        errors.append("alias needs 'previousId'")
    mid = event.get("messageId")
    if mid is not None:
        if not isinstance(mid, str):
            errors.append("messageId must be a string")
        elif len(mid) > MESSAGE_ID_MAX:
            errors.append(f"messageId is longer than {MESSAGE_ID_MAX} characters")
    for key in ("properties", "traits", "context", "integrations"):
        value = event.get(key)
        if value is not None and not isinstance(value, dict):
            errors.append(f"{key} must be an object")
    for key in ("timestamp", "sentAt", "originalTimestamp"):
        value = event.get(key)
        if value is not None and not isinstance(value, str):
            errors.append(f"{key} must be an ISO-8601 string")
    return errors
