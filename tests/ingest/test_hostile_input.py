"""Hostile input never gives a 5xx: nesting of any depth and width, against the
running service (a process of its own, blocking clients)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.ingest.conftest import SERVER_KEY, basic
from tests.ingest.helpers import LiveIngest, http

HEADERS = {"Authorization": basic(SERVER_KEY), "Content-Type": "application/json"}
ORJSON_WRITE_LIMIT = 254  # an event nested deeper than this cannot be forwarded


def nested(depth: int, width: int, kind: str) -> str:
    """JSON text nested ``depth`` containers deep with ``width - 1`` siblings at each
    level, built as text (json.dumps itself recurses)."""
    opens, closes = [], []
    for level in range(depth):
        as_list = kind == "list" or (kind == "mixed" and level % 2)
        if as_list:
            opens.append("[" + "0," * (width - 1))
            closes.append("]")
        else:
            opens.append("{" + "".join(f'"s{i}":{i},' for i in range(width - 1)) + '"x":')
            closes.append("}")
    return "".join(opens) + "1" + "".join(reversed(closes))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    depth=st.integers(0, 3000),
    width=st.integers(1, 4),
    kind=st.sampled_from(["dict", "list", "mixed"]),
    field=st.sampled_from(["properties", "context", "traits"]),
    batch=st.booleans(),
)
@example(depth=1000, width=1, kind="dict", field="properties", batch=False)  # answered 500 before
@example(depth=1000, width=1, kind="dict", field="properties", batch=True)
@example(depth=253, width=2, kind="list", field="properties", batch=False)
@example(depth=5000, width=1, kind="list", field="context", batch=True)
def test_any_nesting_answers_400_with_a_clear_message_never_500(
    live_ingest: LiveIngest, depth: int, width: int, kind: str, field: str, batch: bool
) -> None:
    value = nested(depth, width, kind)
    if field == "properties" or field == "context":
        event = f'{{"type":"track","event":"E","userId":"u","{field}":{{"deep":{value}}}}}'
        path = "/v1/track"
    else:
        event = f'{{"type":"identify","userId":"u","traits":{{"deep":{value}}}}}'
        path = "/v1/identify"
    # The event object, its field and "deep" add three levels; a batch adds two more.
    event_depth = depth + 3
    body = f'{{"batch":[{{"type":"track","event":"ok","userId":"u"}},{event}]}}' if batch else event
    status, headers, raw = http("POST", live_ingest.url + ("/v1/batch" if batch else path), body.encode(), HEADERS)
    assert status < 500, (status, raw[:300])
    assert headers["Content-Type"].startswith("application/json")
    answer = json.loads(raw)
    whole_depth = event_depth + (2 if batch else 0)
    if whole_depth > 1024:
        assert status == 400 and answer["error"] == "invalid_json" and "nested deeper" in answer["message"]
    elif event_depth > ORJSON_WRITE_LIMIT:
        if batch:
            assert status == 200 and answer["accepted"] == 1
            assert "nested deeper" in answer["rejected"][0]["errors"][0]
        else:
            assert status == 400 and answer["error"] == "invalid_event" and "nested deeper" in answer["message"]
    else:
        assert status == 200 and answer["success"] is True, answer
