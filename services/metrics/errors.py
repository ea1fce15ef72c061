"""Errors of the metrics service, under the shared HeadwaterError root."""

from __future__ import annotations

from services.common.errors import HeadwaterError


class MetricsError(HeadwaterError):
    """Root of the metrics service's own errors."""


class QueryError(MetricsError):
    """A KairosDB query or write that cannot be answered as asked (an HTTP 400)."""

    def __init__(self, *errors: str) -> None:
        super().__init__("; ".join(errors))
        self.errors = list(errors)


class QueryTooLarge(QueryError):
    """A query would read more rows than the query_max_rows setting allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the query reads more than {limit} rows; narrow the time range or the tags")


class RangeTooLarge(QueryError):
    """A query's time range spans more Cassandra partitions than the query_max_buckets setting allows."""

    def __init__(self, buckets: int, limit: int) -> None:
        super().__init__(
            f"the time range spans {buckets} storage buckets, more than the {limit} allowed; narrow the time range"
        )


class ConsumerBroken(MetricsError):
    """The rollup consumer failed half-way (a rebalance callback included) and must be restarted."""
