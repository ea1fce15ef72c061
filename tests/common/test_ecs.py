"""Our ECS lines against Elastic's ecs-logging formatter, exceptions in error.*, no clashing names.

The shape is ours (services/common/logging.py says why); here it has to equal what the
library prints for the same events, written with ECS names, once both are nested. The
only differences allowed are the timestamp's instant and the ECS version each claims.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import ecs_logging
import pytest
import structlog

from services.common.logging import ECS_VERSION, configure_logging
from tests.common.ecs import expand_keys, type_problems

SERVICE = "unit-test"


@pytest.fixture
def reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def _boom() -> None:
    raise ValueError("boom")


def _emit(log: Any, level: str, message: str, fields: dict[str, Any], *, raise_first: bool) -> None:
    if not raise_first:
        getattr(log, level)(message, **fields)
        return
    try:
        _boom()
    except ValueError as exc:
        extra = {k: (exc if v == "<exc>" else v) for k, v in fields.items()}
        getattr(log, level)(message, **extra)


# (level, message, our call's fields, the same event with ECS names, raised first)
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any], bool]] = [
    (
        "info",
        "partition opened",
        {"kafka.topic": "t", "kafka.partition": 3, "kafka.offset": 7, "committed": 7},
        {"kafka.topic": "t", "kafka.partition": 3, "kafka.offset": 7, "committed": 7},
        False,
    ),
    (
        "warning",
        "request refused",
        {"status": 503, "error": "unavailable", "request_id": "r-2"},
        {"http.response.status_code": 503, "error.message": "unavailable", "request_id": "r-2"},
        False,
    ),
    (
        "info",
        "partition resumed",
        {"status": "sought", "kafka.partition": 0},
        {"status": "sought", "kafka.partition": 0},
        False,
    ),
    (
        "info",
        "serving",
        {"service": "ingest", "host": "127.0.0.1", "port": 8080, "worker": 0},
        {"labels.service": "ingest", "labels.host": "127.0.0.1", "port": 8080, "worker": 0},
        False,
    ),
    (
        "warning",
        "parity differs",
        {"source": "shop", "cells": 2, "largest": 5},
        {"labels.source": "shop", "cells": 2, "largest": 5},
        False,
    ),
    (
        "warning",
        "bad pixel could not be dead-lettered: spool full",
        {"request_id": "r-3", "source_id": "web"},
        {"request_id": "r-3", "labels.source": "web"},
        False,
    ),
    (
        "info",
        "shard lease taken",
        {"stream": "s", "checkpoint": {"seq": "49"}, "partitions": [0, 1]},
        {"stream": "s", "checkpoint": {"seq": "49"}, "partitions": [0, 1]},
        False,
    ),
    (
        "exception",
        "could not start",
        {"error": "ValueError('boom')"},
        {"error.type": "ValueError", "error.message": "ValueError('boom')"},
        True,
    ),
    (
        "error",
        "processor loop failed",
        {"exc_info": "<exc>"},
        {"exc_info": "<exc>", "error.type": "ValueError", "error.message": "boom"},
        True,
    ),
]


def test_lines_equal_the_ecs_logging_formatter(capsys: pytest.CaptureFixture[str], reset_logging: None) -> None:
    configure_logging(SERVICE, "INFO")
    log = structlog.get_logger()
    with structlog.contextvars.bound_contextvars(request_id="r-1"):
        for level, message, fields, _, raised in CASES:
            _emit(log, level, message, fields, raise_first=raised)
    ours = _lines(capsys)

    structlog.reset_defaults()
    formatter: Any = ecs_logging.StructlogFormatter()  # typed for a plain dict; structlog passes one
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="@timestamp"),
            structlog.processors.format_exc_info,
            formatter,
        ],
        logger_factory=structlog.PrintLoggerFactory(),
    )
    theirs_log = structlog.get_logger()
    with structlog.contextvars.bound_contextvars(request_id="r-1", **{"service.name": SERVICE}):
        for level, message, _, ecs_fields, raised in CASES:
            _emit(theirs_log, level, message, ecs_fields, raise_first=raised)
    theirs = _lines(capsys)

    assert len(ours) == len(theirs) == len(CASES)
    for mine, lib, case in zip(ours, theirs, CASES, strict=True):
        assert mine["ecs.version"] == ECS_VERSION and lib["ecs.version"] == ecs_logging.ECS_VERSION
        for line in (mine, lib):
            assert line.pop("@timestamp").endswith("Z")
            line.pop("ecs.version")
        # The library nests every dotted key but log.level; nest both the way Filebeat does.
        assert expand_keys(mine) == expand_keys(lib), case[1]
        assert type_problems({**mine, "@timestamp": "2026-01-01T00:00:00Z", "ecs.version": ECS_VERSION}) == []


def test_exceptions_land_in_error_fields(capsys: pytest.CaptureFixture[str], reset_logging: None) -> None:
    configure_logging(SERVICE, "INFO")
    log = structlog.get_logger()
    try:
        _ = dict[str, int]()["missing"]
    except KeyError:
        log.exception("lookup failed", what="cache")
        logging.getLogger("cassandra.cluster").exception("host down")
    try:
        raise ConnectionError("kafka away")
    except ConnectionError as exc:
        failure = exc
    log.error("publisher died", exc_info=failure)
    lines = _lines(capsys)
    assert [line["error.type"] for line in lines] == ["KeyError", "KeyError", "ConnectionError"]
    assert [line["error.message"] for line in lines] == ["'missing'", "'missing'", "kafka away"]
    for line in lines:
        assert line["error.stack_trace"].startswith("Traceback (most recent call last):")
        assert line["error.stack_trace"].rstrip().endswith(f"{line['error.type']}: {line['error.message']}")
        assert line["log.level"] == "error" and "exception" not in line and "exc_info" not in line
    assert lines[1]["log.logger"] == "cassandra.cluster"
    assert "publisher died" == lines[2]["message"] and "raise ConnectionError" in lines[2]["error.stack_trace"]
    # An exception type outside builtins is named with its module.
    structlog.get_logger().error("x", exc_info=json.JSONDecodeError("bad", "{", 0))
    assert _lines(capsys)[0]["error.type"] == "json.decoder.JSONDecodeError"


def test_no_field_is_both_a_value_and_an_object(capsys: pytest.CaptureFixture[str], reset_logging: None) -> None:
    """A search engine refuses a line whose ``service`` is a string beside ``service.name``."""
    configure_logging(SERVICE, "INFO")
    log = structlog.get_logger()
    log.info("serving", service="ingest", host="0.0.0.0", group="g1", log="x", url="/v1/t")
    log.info("odd", kafka="broker-1", **{"kafka.topic": "t"}, message="a message field", user={"id": "u1"})
    first, second = _lines(capsys)
    assert first["service.name"] == SERVICE and first["labels.service"] == "ingest"
    assert (first["labels.host"], first["labels.group"], first["labels.log"], first["labels.url"]) == (
        "0.0.0.0",
        "g1",
        "x",
        "/v1/t",
    )
    assert second["labels.kafka"] == "broker-1" and second["kafka.topic"] == "t"
    assert second["message"] == "odd" and second["labels.message"] == "a message field"
    assert second["user"] == {"id": "u1"}  # an object under an ECS object name is left to be merged
    for line in (first, second):
        assert type_problems(line) == []


def test_type_problems_catch_what_an_engine_refuses() -> None:
    good = {
        "@timestamp": "2026-01-01T00:00:00Z",
        "message": "m",
        "log.level": "info",
        "service.name": "s",
        "ecs.version": ECS_VERSION,
    }
    assert type_problems(good) == []
    assert type_problems({**good, "service": "ingest"}) == ["service is an object and a value"]
    assert type_problems({"error": "x", **good, "error.type": "E"}) == [
        "error is a value and error.type needs it as an object"
    ]
    assert type_problems({**good, "kafka.partition": "3"}) == ["kafka.partition: '3' is not a long"]
    assert type_problems({**good, "@timestamp": "yesterday"}) == ["@timestamp: 'yesterday' is not a date"]
    assert type_problems({**good, "labels.peer": {"id": 1}}) == ["labels.peer.id: labels hold values, not objects"]
    assert "message missing" in type_problems({k: v for k, v in good.items() if k != "message"})
