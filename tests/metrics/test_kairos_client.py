"""KairosDB's own Java client (org.kairosdb:client 3.1.1, resolved by Maven and cached like the
dev stack's jars) against the running metrics service with Basic auth on reads and writes:
version, status, status check, push, metric names, query, query tags, delete, delete metric."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from services.devstack.stack import StackSettings
from services.metrics.app import build_app
from tests.metrics.conftest import MakeSettings

HERE = Path(__file__).parent / "kairos_client"
HOUR = 3_600_000
MIN = 60_000


def _resolve(stack: StackSettings) -> Path:
    """The client's jars and their dependencies, copied once into the stack's jar cache."""
    pom = HERE / "pom.xml"
    lib = stack.home / f"kairos-client-3.1.1-{hashlib.sha256(pom.read_bytes()).hexdigest()[:10]}" / "lib"
    if (lib / ".complete").exists():
        return lib
    staging = lib.with_name("lib.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    done = subprocess.run(
        [
            stack.mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shutil.rmtree(lib, ignore_errors=True)
    staging.rename(lib)
    (lib / ".complete").touch()
    return lib


@pytest.fixture(scope="session")
def probe_classpath(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Probe.java compiled against the client: the classpath to run it with."""
    stack = StackSettings()
    lib = _resolve(stack)
    out = tmp_path_factory.mktemp("kairos-probe")
    javac = str(Path(stack.java).with_name("javac"))
    if not Path(javac).exists():
        javac = shutil.which("javac") or "javac"
    done = subprocess.run(
        [javac, "-cp", f"{lib}/*", "-d", str(out), str(HERE / "Probe.java")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return f"{out}:{lib}/*"


async def test_kairosdb_java_client_against_the_service(metrics_settings: MakeSettings, probe_classpath: str) -> None:
    password = "probe-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:12]
    settings = await metrics_settings(
        partitions=1, api_user=SecretStr("kairos"), api_password=SecretStr(password), api_auth_reads=True
    )
    t0 = (int(time.time() * 1000) // HOUR - 2) * HOUR
    app = await build_app(settings, consume=False)
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url("")).rstrip("/")
        proc = await asyncio.create_subprocess_exec(
            StackSettings().java,
            "-cp",
            probe_classpath,
            "Probe",
            url,
            str(t0),
            "kairos",
            password,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 180)
        # Without credentials the same client is refused (reads are behind auth here).
        anonymous = await asyncio.create_subprocess_exec(
            StackSettings().java,
            "-cp",
            probe_classpath,
            "Probe",
            url,
            str(t0),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, anonymous_err = await asyncio.wait_for(anonymous.communicate(), 180)
    assert proc.returncode == 0, err.decode()[-4000:]
    got = orjson.loads(out.decode().strip().splitlines()[-1])
    assert got["version"].startswith("KairosDB 1.3")
    assert got["status"] == ["JVM-Thread-Deadlock: OK", "Datastore-Query: OK"]
    assert got["statusCheck"] == 204
    assert "jc.temp" in got["metricNames"] and "headwater.events.count" in got["metricNames"]
    (query,) = got["query"]
    assert query["sampleSize"] == 4
    assert [(r["name"], r["tags"], r["groups"], r["values"]) for r in query["results"]] == [
        ("jc.temp", {"host": ["a"]}, [{"host": "a"}, "type"], [[t0, 6.5]]),
        ("jc.temp", {"host": ["b"]}, [{"host": "b"}, "type"], [[t0, 10.0]]),
    ]
    assert got["queryTags"] == {"host": ["a"]}
    (after,) = got["afterDelete"]
    assert after["sampleSize"] == 1 and after["results"][0]["values"] == [[t0, 1.0]]
    assert "jc.temp" not in got["metricNamesAfterDeleteMetric"]
    assert anonymous.returncode != 0
    assert "401" in anonymous_err.decode() or "authentication" in anonymous_err.decode().lower()
    assert password not in err.decode() + anonymous_err.decode()
