"""Generated query and write bodies, plausible and not, through the parser, the query service
over a few stored points and the write format: every answer is a result or a QueryError (a
KairosDB 400), never a crash."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from services.metrics.aggregators import AGGREGATORS
from services.metrics.errors import QueryError
from services.metrics.external import ExternalPoint
from services.metrics.metrics import make_metrics
from services.metrics.periods import UNITS
from services.metrics.query import QueryService
from services.metrics.settings import Settings
from services.metrics.writes import parse_datapoints

T0 = 1_795_525_200_000
POINTS = [
    ExternalPoint(T0 + i * 37_000 + (i % 3), orjson.dumps({"h": "ab"[i % 2]}).decode(), float(i % 7) - 2, i % 2 == 0)
    for i in range(120)
]

anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` nine times in ten, anything else the tenth."""
    return st.integers(0, 9).flatmap(lambda i: anything if i == 9 else valid)


unit = mostly(st.sampled_from([*UNITS, *(u.upper() for u in UNITS), "fortnights"]))
duration = mostly(
    st.fixed_dictionaries({"value": mostly(st.integers(-1, 50) | st.integers(2**30, 2**40)), "unit": unit})
)
RANGE_OPTIONS = {
    "sampling": duration,
    "align_sampling": mostly(st.booleans()),
    "align_start_time": st.booleans(),
    "align_end_time": st.booleans(),
    "time_zone": mostly(st.sampled_from(["UTC", "Australia/Lord_Howe"])),
}
OPTIONS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "dev": {
        **RANGE_OPTIONS,
        "return_type": st.sampled_from(["value", "pos_sd", "neg_sd", "x"]),
        "dev_count": mostly(st.integers(0, 3)),
    },
    "percentile": {**RANGE_OPTIONS, "percentile": mostly(st.floats(-1, 2))},
    "gaps": {**RANGE_OPTIONS, "trim": mostly(st.booleans())},
    "div": {"divisor": mostly(st.floats(-3, 3))},
    "scale": {"factor": mostly(st.floats(-3, 3))},
    "filter": {"filter_op": st.sampled_from(["lt", "LTE", "gt", "equal", "ne", "x"]), "threshold": mostly(st.floats())},
    "rate": {"unit": unit, "sampling": duration},
    "sampler": {"unit": unit},
    "sma": {"size": mostly(st.integers(-1, 5))},
    "trim": {"trim": mostly(st.sampled_from(["first", "last", "both"]))},
    "diff": {},
    "save_as": {"metric_name": mostly(st.sampled_from(["copy", ""]))},
}
aggregator = mostly(
    st.sampled_from(AGGREGATORS).flatmap(
        lambda name: st.fixed_dictionaries({"name": st.just(name)}, optional=OPTIONS.get(name, RANGE_OPTIONS))
    )
)
grouper = mostly(
    st.one_of(
        st.fixed_dictionaries({"name": st.just("tag"), "tags": st.lists(st.sampled_from(["h", "x"]), max_size=2)}),
        st.fixed_dictionaries(
            {"name": st.just("time"), "range_size": duration, "group_count": mostly(st.integers(-1, 4))}
        ),
        st.fixed_dictionaries({"name": st.just("value"), "range_size": mostly(st.integers(-1, 4))}),
        st.fixed_dictionaries({"name": st.just("bin"), "bins": mostly(st.lists(st.floats(-5, 5), max_size=3))}),
    )
)
metric = mostly(
    st.fixed_dictionaries(
        {"name": mostly(st.just("m"))},
        optional={
            "aggregators": mostly(st.lists(aggregator, max_size=3)),
            "group_by": mostly(st.lists(grouper, max_size=2)),
            "tags": st.dictionaries(st.sampled_from(["h", "x"]), mostly(st.sampled_from(["a", "b"])), max_size=2),
            "limit": mostly(st.integers(-1, 50)),
            "order": mostly(st.sampled_from(["asc", "desc"])),
            "exclude_tags": mostly(st.booleans()),
        },
    )
)
body = mostly(
    st.fixed_dictionaries(
        {
            "metrics": mostly(st.lists(metric, min_size=1, max_size=2)),
            "start_absolute": mostly(st.integers(T0 - 3_600_000, T0)),
        },
        optional={
            "end_absolute": mostly(st.integers(T0, T0 + 7_200_000)),
            "time_zone": st.sampled_from(["UTC", "Asia/Kabul", "Nope/Zone"]),
        },
    )
)


async def _read(*_: object, **kwargs: Any) -> list[ExternalPoint]:
    keep = kwargs.get("keep", lambda _: True)
    out = [p for p in POINTS if keep(p.tags)]
    return out[::-1] if kwargs.get("descending") else out


async def _texts(_: str) -> list[str]:
    return ['{"h":"a"}', '{"h":"b"}']


SERVICE = QueryService(
    SimpleNamespace(),  # type: ignore[arg-type]
    SimpleNamespace(read=_read, series_texts=_texts),  # type: ignore[arg-type]
    Settings(query_max_rows=10_000),
    make_metrics(CollectorRegistry()),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body)
def test_any_query_is_an_answer_or_a_kairosdb_400(query: dict[str, Any]) -> None:
    async def run() -> None:
        try:
            answer = await SERVICE.run(query, T0 + 7_200_000, can_write=False)
        except QueryError as exc:
            assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
            return
        assert isinstance(answer["queries"], list)
        orjson.dumps(answer)  # what the API sends: bigint times, finite numbers

    asyncio.run(run())


write_metric = mostly(
    st.fixed_dictionaries(
        {"name": mostly(st.sampled_from(["w", "headwater.events.count", ""]))},
        optional={
            "tags": mostly(st.dictionaries(st.text(max_size=4), mostly(st.text(max_size=4)), max_size=3)),
            "datapoints": mostly(
                st.lists(
                    mostly(st.tuples(mostly(st.integers(-1, 2**64)), mostly(st.integers() | st.floats())).map(list)),
                    max_size=4,
                )
            ),
            "timestamp": anything,
            "value": anything,
            "ttl": mostly(st.integers(-5, 2**40)),
            "type": st.sampled_from(["long", "double", "string"]),
        },
    )
)


@settings(max_examples=1000, deadline=None)
@given(mostly(st.lists(write_metric, max_size=3)))
def test_any_write_body_is_rows_or_a_kairosdb_400(payload: Any) -> None:
    try:
        rows = parse_datapoints(payload)
    except QueryError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
        return
    for name, ts, tags, value, is_long, ttl in rows:
        assert name and 0 <= ts < 2**63 and orjson.loads(tags) and math.isfinite(value) and isinstance(is_long, bool)
        assert ttl is None or 0 < ttl <= 630_720_000
