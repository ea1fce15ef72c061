"""Logs are one ECS JSON object per line, from structlog and stdlib loggers alike."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from services.common.logging import configure_logging


def test_structlog_and_stdlib_lines_are_ecs_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("unit-test", "INFO")
    try:
        with structlog.contextvars.bound_contextvars(request_id="r-1"):
            structlog.get_logger("x").info("hello", **{"kafka.topic": "t", "kafka.partition": 3})
        logging.getLogger("some.library").warning("from %s", "stdlib")
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    first, second = lines[-2], lines[-1]
    assert first["message"] == "hello" and first["log.level"] == "info"
    assert first["service.name"] == "unit-test" and first["request_id"] == "r-1"
    assert first["kafka.topic"] == "t" and first["kafka.partition"] == 3
    assert first["@timestamp"].endswith("Z")
    assert second["message"] == "from stdlib" and second["log.level"] == "warning"
    assert second["log.logger"] == "some.library"
