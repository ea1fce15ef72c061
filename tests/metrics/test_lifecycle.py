"""The metrics service's lifecycle through the one runner: what a failed start
leaves behind, and the order its parts stop in."""

from __future__ import annotations

import gc

import pytest

from services.common.errors import DependencyUnavailable
from services.metrics.app import RollupParts, build_service
from tests.helpers import free_port
from tests.metrics.conftest import MakeSettings


@pytest.mark.integration
async def test_a_start_refused_by_cassandra_leaves_no_kafka_client_behind(metrics_settings: MakeSettings) -> None:
    settings = await metrics_settings(cassandra_port=free_port(), cassandra_timeout_s=2.0)
    service = build_service(settings)
    with pytest.raises(DependencyUnavailable):
        await service.start()
    # An aiokafka client made and never started warns when collected (an error in this suite).
    gc.collect()
    parts = next(c for c in service.components if isinstance(c, RollupParts))
    with pytest.raises(RuntimeError, match="not made"):
        _ = parts.consumer


@pytest.mark.integration
async def test_the_consumer_loop_stops_before_the_side_producer_and_cassandra(metrics_settings: MakeSettings) -> None:
    service = build_service(await metrics_settings())
    names = [c.name for c in service.components]
    assert names.index("rollup consumer") > names.index("side producer") > names.index("cassandra")
    await service.start()
    try:
        assert all(c.started for c in service.components)
    finally:
        await service.stop()
    assert not any(c.started for c in service.components)
