"""The exception root shared by every Headwater service."""

from __future__ import annotations


class HeadwaterError(Exception):
    """Base of every error a Headwater service raises on purpose.

    ``retriable`` tells the caller whether the same call may succeed later
    (a broker that is down) or never will (bad input, bad config).
    """

    retriable: bool = False


class ConfigError(HeadwaterError):
    """A setting is missing or invalid; the service cannot start."""


class DependencyUnavailable(HeadwaterError):
    """Kafka or Cassandra did not answer in time."""

    retriable = True
