"""The dev stack's Kinesis server: started like the other servers, listed by status,
stopped by down, and its streams kept on disk across a restart."""

from __future__ import annotations

import uuid
from pathlib import Path

from services.bridge.kinesis import kinesis_client
from services.devstack import stack
from services.devstack.kinesis import kinesis_answers, kinesis_server
from tests.bridge.conftest import wait_active
from tests.bridge.helpers import bridge_settings
from tests.helpers import free_port


async def test_up_status_down_up_keeps_streams(
    stack_settings: stack.StackSettings, kinesis_endpoint: str, tmp_path: Path
) -> None:
    private = stack.StackSettings(
        home=stack_settings.home,
        data_dir=tmp_path,
        kinesis_port=free_port(),
        kafka_port=free_port(),
        cassandra_port=free_port(),
    )
    server = kinesis_server(private)
    try:
        timings = stack.up(private, kafka=False, cassandra=False, kinesis=True)
        assert "kinesis" in timings and server.pid() is not None
        line = next(line for line in stack.status(private) if line.startswith("kinesis"))
        assert "running pid" in line and str(private.kinesis_port) in line
        name = f"stack-{uuid.uuid4().hex[:8]}"
        async with kinesis_client(bridge_settings(aws_endpoint_url=private.kinesis_endpoint)) as client:
            await client.create_stream(StreamName=name, ShardCount=1)
            await wait_active(client, name)

        assert server.stop() and server.pid() is None and not kinesis_answers(private)
        assert "stopped" in next(line for line in stack.status(private) if line.startswith("kinesis"))

        stack.up(private, kafka=False, cassandra=False, kinesis=True)
        async with kinesis_client(bridge_settings(aws_endpoint_url=private.kinesis_endpoint)) as client:
            assert name in (await client.list_streams())["StreamNames"]
    finally:
        server.kill()
