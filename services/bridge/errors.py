"""The bridge's errors, and which Kinesis errors a retry can help."""

from __future__ import annotations

from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, ReadTimeoutError
from cassandra import DriverException, RequestExecutionException
from cassandra.cluster import NoHostAvailable

from services.common.errors import HeadwaterError

# Kinesis error codes that mean "later": throughput, throttling, the service itself.
RETRIABLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "KMSThrottlingException",
        "ThrottlingException",
        "InternalFailure",
        "ServiceUnavailable",
        "InternalServerError",
    }
)
THROUGHPUT_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "KMSThrottlingException",
        "ThrottlingException",
    }
)

# Cassandra answers that mean "it is away or slow", not "the request is wrong".
CASSANDRA_ERRORS: tuple[type[Exception], ...] = (DriverException, RequestExecutionException, NoHostAvailable)


class BridgeError(HeadwaterError):
    """Root of the bridge's own errors; ``retriable`` says whether trying again can help."""

    retriable = False


class LeaseLost(BridgeError):
    """Another process holds the shard now; this one stops reading it."""


def error_code(exc: BaseException) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def retriable(exc: BaseException) -> bool:
    """A Kinesis call that failed this way may succeed later."""
    if isinstance(exc, ClientError):
        return error_code(exc) in RETRIABLE_CODES
    return isinstance(exc, ConnectionError | HTTPClientError | ReadTimeoutError | TimeoutError)
