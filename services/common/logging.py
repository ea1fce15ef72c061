"""structlog configured to print one ECS-shaped JSON object per line on stdout.

The shape is ours, not Elastic's ``ecs-logging`` formatter, and a test
(tests/common/test_ecs.py) holds it equal to that library's output for the same
events once both are nested. We keep our own because:

- it never raises: the library turns dotted keys into nested objects and raises
  ``TypeError`` when a call passes both ``error="..."`` and an exception (33 call
  sites pass ``error=``), i.e. a log call could crash the code that logs;
- it fills ``error.type`` and ``error.message`` from an exception (the library
  only writes ``error.stack_trace``) and claims the ECS version it follows
  (the library says 1.6.0);
- it renders with orjson and keeps dotted keys flat (``"kafka.topic": ...``),
  which ECS allows and Filebeat's ``expand_keys`` nests.

What a search engine needs from a line, beyond the names: no field may be both a
value and an object. ES/OpenSearch expand ``service.name`` into an object
``service``, so a line that also has ``service="ingest"`` is rejected whole.
So, in one place here rather than at every call site:

- ``error="..."`` becomes ``error.message``; an exception (``log.exception``,
  ``exc_info=``, a stdlib record's) fills ``error.type``, ``error.message`` (unless
  the call gave one) and ``error.stack_trace``;
- ``source`` and ``source_id`` (a Headwater source id; ECS's ``source`` is the
  network peer) become ``labels.source``;
- an integer ``status`` (an HTTP answer's, as ingest and the metrics API log it)
  becomes ``http.response.status_code``: the word statuses (a partition's
  ``"sought"``) keep ``status``, and one field never holds both a number and a word
  (the engine maps it by the first line it sees and refuses the others);
- any other plain key that names an ECS object (``service``, ``host``, ``group``,
  ``log``, ...) or the head of a dotted key on the same line becomes
  ``labels.<key>``, ECS's place for custom keyword values.

Bound context (``structlog.contextvars``: request_id, kafka.topic, ...) is merged
into every line. No secret may be passed to a log call: the shape copies what it
is given (tests/ingest/test_no_key_leaves.py searches ingest's whole log).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

ECS_VERSION = "8.11.0"

# ECS field sets whose top-level name is an object: a plain value under one of
# these names would clash with the ECS fields below it.
ECS_OBJECTS = frozenset(
    {
        "agent",
        "as",
        "client",
        "cloud",
        "code_signature",
        "container",
        "data_stream",
        "destination",
        "device",
        "dll",
        "dns",
        "ecs",
        "elf",
        "email",
        "error",
        "event",
        "faas",
        "file",
        "geo",
        "group",
        "hash",
        "host",
        "http",
        "interface",
        "log",
        "macho",
        "network",
        "observer",
        "orchestrator",
        "organization",
        "os",
        "package",
        "pe",
        "process",
        "registry",
        "related",
        "risk",
        "rule",
        "server",
        "service",
        "source",
        "span",
        "threat",
        "tls",
        "trace",
        "transaction",
        "url",
        "user",
        "user_agent",
        "vlan",
        "vulnerability",
        "x509",
        "labels",
    }
)
# Keys that name a Headwater source id, whatever a call site called it.
SOURCE_KEYS = ("source", "source_id")


def _exc_info(value: Any) -> tuple[type[BaseException], BaseException, Any] | None:
    if isinstance(value, BaseException):
        return type(value), value, value.__traceback__
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return value
    if value is True:
        kind, exc, tb = sys.exc_info()
        if kind is not None and exc is not None:
            return kind, exc, tb
    return None


def _error_type(kind: type[BaseException]) -> str:
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def error_fields(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """``error.type`` and ``error.message`` from an exception; ``error=`` text as ``error.message``.

    Runs before structlog's ``format_exc_info``, which renders the trace that the
    shape puts in ``error.stack_trace``."""
    given = event.pop("error", None)
    if given is not None:
        event["error.message"] = given if isinstance(given, str) else repr(given)
    info = _exc_info(event.get("exc_info"))
    if info is not None:
        event["error.type"] = _error_type(info[0])
        event.setdefault("error.message", str(info[1]))
    return event


def _custom_fields(event: EventDict) -> dict[str, Any]:
    """The call's own fields, moved off names that ECS (or another key of the line) uses for an object."""
    heads = {key.split(".", 1)[0] for key in event if "." in key}
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in SOURCE_KEYS:
            out["labels.source"] = value
        elif key == "status" and isinstance(value, int) and not isinstance(value, bool):
            out["http.response.status_code"] = value
        elif "." not in key and (key in ECS_OBJECTS or key in heads) and not isinstance(value, dict):
            out[f"labels.{key}"] = value
        else:
            out[key] = value
    return out


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
        for key in ("message", "@timestamp"):
            if key in event:  # a call's own "message=" keeps its value beside the event's
                event[f"labels.{key}"] = event.pop(key)
        # Everything else as the call named it (dotted keys such as kafka.topic
        # stay flat; Filebeat's expand_keys nests them), off ECS's object names.
        out.update(_custom_fields(event))
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
        error_fields,
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, _ecs_shape(service_name), _render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _ecs_shape(service_name), _render],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric < logging.INFO else numeric)
    # The Cassandra driver and aiokafka are chatty at INFO about routine reconnects.
    logging.getLogger("cassandra").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("aiokafka").setLevel(max(numeric, logging.WARNING))
