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
_TYPE_SET = frozenset(TYPES)
_OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
_TIME_FIELDS = ("timestamp", "sentAt", "originalTimestamp")


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


def validate(event: Any, expected_type: str | None = None) -> list[str]:  # noqa: C901 - every event passes here: one flat pass, a call per check would cost on each
    """Return what is wrong with ``event`` against the spec (empty when valid).

    ``expected_type`` is the type implied by the path (/v1/track); an event
    with no "type" takes it, one with another type is an error.
    """
    if not isinstance(event, dict):
        return [f"event must be a JSON object, got {type(event).__name__}"]
    # Every event of every request passes here: one lookup per field, checks ordered
    # so that a valid event does the least work.
    get = event.get
    errors: list[str] = []
    etype = get("type", expected_type)
    if expected_type and etype != expected_type:
        errors.append(f"type {etype!r} does not match the path's type {expected_type!r}")
    if not isinstance(etype, str) or etype not in _TYPE_SET:
        errors.append(f"type must be one of {', '.join(TYPES)}; got {etype!r}")
    user_id, anonymous_id = get("userId"), get("anonymousId")
    has_user = user_id is not None and user_id != ""
    has_anonymous = anonymous_id is not None and anonymous_id != ""
    if has_user and not isinstance(user_id, _ID_TYPES):
        errors.append("userId must be a string or a number")
    if has_anonymous and not isinstance(anonymous_id, _ID_TYPES):
        errors.append("anonymousId must be a string or a number")
    if not (has_user or has_anonymous):
        errors.append("userId or anonymousId is required")
    if etype == "track":
        name = get("event")
        if not isinstance(name, str) or not name:
            errors.append("track needs a non-empty string 'event'")
    elif etype == "group" and not present(get("groupId")):
        errors.append("group needs 'groupId'")
    elif etype == "alias" and not present(get("previousId")):
        errors.append("alias needs 'previousId'")
    mid = get("messageId")
    if mid is not None:
        if not isinstance(mid, str):
            errors.append("messageId must be a string")
        elif len(mid) > MESSAGE_ID_MAX:
            errors.append(f"messageId is longer than {MESSAGE_ID_MAX} characters")
    for key in _OBJECT_FIELDS:
        value = get(key)
        if value is not None and not isinstance(value, dict):
            errors.append(f"{key} must be an object")
    for key in _TIME_FIELDS:
        value = get(key)
        if value is not None and not isinstance(value, str):
            errors.append(f"{key} must be an ISO-8601 string")
    return errors
