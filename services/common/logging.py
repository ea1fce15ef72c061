"""structlog configured to print one ECS-shaped JSON object per line on stdout."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

ECS_VERSION = "8.11.0"


def _ecs_shape(service_name: str) -> structlog.typing.Processor:
    def shape(_: WrappedLogger, method: str, event: EventDict) -> EventDict:
        out: dict[str, Any] = {
            "@timestamp": event.pop("timestamp"),
            "log.level": event.pop("level", method),
            "message": event.pop("event", ""),
            "service.name": service_name,
            "ecs.version": ECS_VERSION,
        }
        logger_name = event.pop("logger", None)
        if logger_name:
            out["log.logger"] = logger_name
        exc = event.pop("exception", None)
        if exc:
            out["error.stack_trace"] = exc
        # ECS puts everything else under labels-like custom fields; dotted keys
        # (kafka.topic, http.request.id) keep Kibana's field browser tidy.
        out.update(event)
        return out

    return shape


def _render(_: WrappedLogger, __: str, event: EventDict) -> str:
    return orjson.dumps(event, default=str).decode()


def configure_logging(service_name: str, level: str = "INFO") -> None:
    """Send structlog and stdlib logging (aiokafka, cassandra-driver) to stdout as ECS JSON."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, _ecs_shape(service_name), _render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    _ecs_shape(service_name), _render],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric < logging.INFO else numeric)
    # The Cassandra driver and aiokafka are chatty at INFO about routine reconnects.
    logging.getLogger("cassandra").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("aiokafka").setLevel(max(numeric, logging.WARNING))
