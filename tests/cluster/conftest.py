"""The three-broker, three-node cluster the failure tests run on (services/devstack/cluster.py).

One cluster for the tests of this package (package scope: it is killed as soon as they are
done, not at the end of the whole session, so the rest of a CI run does not share two
cores with six idle JVMs), on its own loopback network (127.<a>.<b>.2-4, drawn at random, so
the shared single-node stack and anyone's ``stack up --nodes 3`` keep their addresses) and
its own data folder; every node is killed at the end. Locally: ``-m 'not cluster'`` skips
these tests; HEADWATER_CLUSTER_NETWORK names a network to reuse a running cluster (with
HEADWATER_STACK_DATA_DIR), and HEADWATER_CLUSTER_KEEP=1 leaves it running afterwards.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import pytest

from services.devstack.cluster import Cluster, ClusterSettings
from services.devstack.stack import StackSettings
from tests.cluster.helpers import FIGURES


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    settings = ClusterSettings(nodes=3)
    stack_settings = StackSettings()
    if "HEADWATER_CLUSTER_NETWORK" not in os.environ:
        settings = settings.model_copy(update={"network": f"127.{random.randrange(100, 250)}.{random.randrange(250)}"})
    if "HEADWATER_STACK_DATA_DIR" not in os.environ:
        stack_settings = stack_settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("cluster")})
    cluster = Cluster.from_settings(settings, stack_settings)
    started = time.monotonic()
    try:
        timings = cluster.up()
        FIGURES.append(
            f"cluster of {settings.nodes}+{settings.nodes} up in {time.monotonic() - started:.1f}s "
            f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})"
        )
        yield cluster
        FIGURES.append(
            "RSS at the end: "
            + ", ".join(f"{line.split()[0]} {line.split('rss')[1].split()[0]} MiB" for line in cluster.status())
        )
    finally:
        if os.environ.get("HEADWATER_CLUSTER_KEEP") != "1":
            cluster.kill()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("cluster failure figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
