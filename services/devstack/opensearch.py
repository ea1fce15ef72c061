"""The dev stack's optional search engine: a single OpenSearch 2.19 node from Maven-resolved jars.

What the log tests index Headwater's lines into (tests/test_logs_search.py), the way
Filebeat would send them to Elasticsearch in compose/. OpenSearch rather than
Elasticsearch because its server and modules are published as plain jars; 2.19 because
it is the last line that runs on Java 17.

A distribution is a home folder: ``lib/`` (the server's class path) and ``modules/``
(each module's jars with its descriptor and security policy, loaded by the node's own
class loaders; a jar on both would fail the node's jar-hell check). Only one module is
needed, transport-netty4: HTTP and the transport layer. No security plugin (plain HTTP
on loopback, no users), ``discovery.type: single-node``. The home is resolved once into
``HEADWATER_STACK_HOME`` (keyed by the poms, the descriptor and the policy); the node's
config, data and log live under the stack's data folder, so ``down`` then ``up`` keeps
the indices.

OpenSearch refuses to run as root ("can not run opensearch as root"). When the stack
runs as root (CI does), the JVM starts in a user namespace of its own (``unshare``)
where it is uid 1000: it has no capability on the machine, less than the Kafka and
Cassandra JVMs beside it, and its files still belong to the stack's user outside.

Settings: ``HEADWATER_STACK_OPENSEARCH_PORT`` (9200), ``_TRANSPORT_PORT`` (9300),
``_HEAP`` (512m).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from services.devstack.server import Server, StackError, wait_until
from services.devstack.stack import StackSettings

OPENSEARCH_VERSION = "2.19.6"
MAIN_CLASS = "org.opensearch.bootstrap.OpenSearch"
MODULE = "transport-netty4"
# The module's descriptor, as a distribution ships it beside the jars (the jar has none).
NETTY4_DESCRIPTOR = f"""\
description=Netty 4 based transport implementation
version={OPENSEARCH_VERSION}
name={MODULE}
classname=org.opensearch.transport.Netty4Plugin
java.version=11
opensearch.version={OPENSEARCH_VERSION}
extended.plugins=
has.native.controller=false
"""


class OpenSearchSettings(BaseSettings):
    """The search engine's ports and heap (``HEADWATER_STACK_OPENSEARCH_*``)."""

    model_config = SettingsConfigDict(env_prefix="HEADWATER_STACK_OPENSEARCH_", frozen=True)

    port: int = 9200
    transport_port: int = 9300
    heap: str = "512m"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _packaged(*parts: str) -> bytes:
    return resources.files("services.devstack").joinpath("opensearch", *parts).read_bytes()


@dataclass
class OpenSearchServer(Server):
    """One OpenSearch node; pid, stop and logs work as for the other JVM servers."""

    @property
    def home(self) -> Path:
        digest = hashlib.sha256(
            b"".join(
                [
                    _packaged("pom.xml"),
                    _packaged(MODULE, "pom.xml"),
                    _packaged("plugin-security.policy"),
                    NETTY4_DESCRIPTOR.encode(),
                ]
            )
        ).hexdigest()[:10]
        return self.settings.home / f"opensearch-{self.version}-{digest}"

    @property
    def lib_dir(self) -> Path:
        return self.home / "lib"

    def resolve(self) -> None:
        """Lay out the distribution's home (lib/, modules/transport-netty4/, plugins/) in the cache once."""
        marker = self.home / ".complete"
        if marker.exists():
            return
        staging = self.home.with_name(self.home.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        module_dir = staging / "modules" / MODULE
        module_dir.mkdir(parents=True)
        (staging / "plugins").mkdir()
        print(f"resolving opensearch {self.version} with Maven ...", file=sys.stderr)
        for pom, target in (("pom.xml", staging / "lib"), (f"{MODULE}/pom.xml", module_dir)):
            with resources.as_file(resources.files("services.devstack").joinpath("opensearch", pom)) as pom_path:
                done = subprocess.run(
                    [
                        self.settings.mvn,
                        "-q",
                        "-B",
                        "-f",
                        str(pom_path),
                        "dependency:copy-dependencies",
                        "-DincludeScope=runtime",
                        f"-DoutputDirectory={target}",
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
            if done.returncode != 0:
                raise StackError(
                    f"Maven could not resolve opensearch {self.version} ({pom}):\n"
                    f"{done.stdout[-4000:]}{done.stderr[-4000:]}"
                )
        (module_dir / "plugin-descriptor.properties").write_text(NETTY4_DESCRIPTOR)
        (module_dir / "plugin-security.policy").write_bytes(_packaged("plugin-security.policy"))
        shutil.rmtree(self.home, ignore_errors=True)
        staging.rename(self.home)
        marker.touch()

    def _config(self, os_settings: OpenSearchSettings) -> Path:
        conf = self.base / "config"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "opensearch.yml").write_text(
            "\n".join(
                [
                    "cluster.name: headwater-dev",
                    "node.name: headwater-dev",
                    "discovery.type: single-node",
                    "network.host: 127.0.0.1",
                    f"http.port: {os_settings.port}",
                    f"transport.port: {os_settings.transport_port}",
                    f"path.data: {self.base / 'data'}",
                    f"path.logs: {self.base / 'logs'}",
                    # A developer's nearly full disk must not turn the indices read-only.
                    "cluster.routing.allocation.disk.threshold_enabled: false",
                    "",
                ]
            )
        )
        (conf / "log4j2.properties").write_bytes(_packaged("log4j2.properties"))
        return conf

    def start(self, os_settings: OpenSearchSettings) -> None:
        conf = self._config(os_settings)
        tmp = self.base / "tmp"
        tmp.mkdir(exist_ok=True)
        jvm = [
            self.settings.java,
            f"-Xms{os_settings.heap}",
            f"-Xmx{os_settings.heap}",
            "-XX:+UseG1GC",
            # From the distribution's jvm.options: date parsing as OpenSearch expects it on Java 17,
            # no JNDI lookups in log messages, Netty without its own direct-memory pools.
            "-Djava.locale.providers=SPI,COMPAT",
            "-Dlog4j2.formatMsgNoLookups=true",
            "-Dlog4j.shutdownHookEnabled=false",
            "-Dlog4j2.disable.jmx=true",
            "-Dfile.encoding=UTF-8",
            "-Djna.nosys=true",
            "-Dio.netty.noUnsafe=true",
            "-Dio.netty.noKeySetOptimization=true",
            "-Dio.netty.recycler.maxCapacityPerThread=0",
            "-Dio.netty.allocator.numDirectArenas=0",
            "-XX:-OmitStackTraceInFastThrow",
            "-Xss1m",
            f"-Djava.io.tmpdir={tmp}",
            f"-Dopensearch.path.home={self.home}",
            f"-Dopensearch.path.conf={conf}",
            "-Dopensearch.distribution.type=tar",
            "-Dopensearch.bundled_jdk=false",
            "-cp",
            f"{self.lib_dir}/*",
            f"-Dheadwater.stack.base={self.base}",
            self.main_class,
        ]
        cmd = [*_unprivileged(), *jvm]
        self.spawn(cmd)


def _unprivileged() -> list[str]:
    """The command prefix that keeps the node from running as root (nothing when it is not root)."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None:
        raise StackError("OpenSearch refuses to run as root and util-linux's unshare is not installed")
    # unshare execs the JVM in place (same pid); uid 1000 inside maps to the stack's user outside.
    return [unshare, "--user", "--map-user=1000", "--map-group=1000", "--"]


def opensearch_server(settings: StackSettings) -> OpenSearchServer:
    return OpenSearchServer("opensearch", OPENSEARCH_VERSION, MAIN_CLASS, settings)


def opensearch_answers(os_settings: OpenSearchSettings, timeout_s: float = 3.0) -> bool:
    """True when the node's cluster health is at least yellow (it takes writes)."""
    url = f"{os_settings.url}/_cluster/health?wait_for_status=yellow&timeout=1s"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - a loopback URL from settings
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def launch_opensearch(settings: StackSettings) -> tuple[OpenSearchServer, Callable[[], bool]]:
    """Start the node unless it runs; return it and the probe that says it answers."""
    os_settings = OpenSearchSettings()
    server = opensearch_server(settings)
    server.resolve()
    if server.pid() is None:
        server.base.mkdir(parents=True, exist_ok=True)
        server.start(os_settings)
    return server, lambda: opensearch_answers(os_settings)


def start_opensearch(settings: StackSettings) -> tuple[OpenSearchServer, float]:
    """Start the node unless it runs; return it and how long it took to answer."""
    server, probe = launch_opensearch(settings)
    return server, wait_until(server, probe, settings.start_timeout_s)
