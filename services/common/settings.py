"""Frozen settings objects read once from the environment at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.errors import ConfigError


class CommonSettings(BaseSettings):
    """What every service reads; each service subclasses it with its own prefix."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    service_name: str = "headwater"
    log_level: str = "INFO"
    # One broker or several, comma-separated ("k1:9092,k2:9092,k3:9092"): a client starts
    # from whichever answers and learns the rest of the cluster from it.
    kafka_bootstrap: str = "127.0.0.1:9092"
    # The address the service's HTTP endpoints (API, /metrics, /healthz, /readyz) bind to.
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    shutdown_timeout_s: float = 15.0
    # The source registry (write keys, limits, enrichment, routing), reloaded when it changes.
    sources_file: Path = Path("config/sources.json")
    sources_reload_s: float = Field(default=2.0, gt=0)
    # Allocations between two young-generation garbage collections (Python's default
    # is 700). A service keeps thousands of short-lived objects in flight (requests,
    # a batch until its commit); with the default they are scanned again and again,
    # promoted, and rescanned by full collections. Start-up objects are frozen out of
    # every collection as well (services/common/runner.py: tune_gc).
    gc_young_threshold: int = Field(default=20_000, ge=100)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_list(cls, value: str) -> str:
        brokers = [b.strip() for b in value.split(",") if b.strip()]
        if not brokers:
            raise ValueError("at least one host:port")
        for broker in brokers:
            host, _, port = broker.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{broker!r} is not host:port")
        return ",".join(brokers)


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build ``cls`` from the environment, turning a validation error into a
    ConfigError that names each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "?"
            problems.append(f"{prefix}{field.upper()}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
