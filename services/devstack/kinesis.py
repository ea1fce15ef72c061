"""The dev stack's optional Kinesis-compatible server: kinesalite, from npm.

kinesalite rather than moto's server mode because the bridge's correctness
rests on resharding behaving as in Kinesis, and kinesalite does: a split or
merge closes the parent, whose records stay readable until its end, where
GetRecords returns no NextShardIterator; the children start empty with
ParentShardId set. moto's server (5.x) moves a split parent's records into
the children and never ends a closed shard's iterator, so a reader would
see every record twice and never learn that a parent is finished. kinesalite
also keeps its streams on disk (``--path``), so ``down`` then ``up`` keeps
them, as Kafka and Cassandra do.

Installed once with npm into ``HEADWATER_STACK_HOME`` (keyed by the
package.json beside this module, so a version change installs afresh) and
run as a detached node process with its pid, data and log under the stack's
data folder, like the JVM servers.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from services.devstack.server import Server, StackError, wait_until
from services.devstack.stack import StackSettings

KINESALITE_VERSION = "3.3.3"


@dataclass
class KinesaliteServer(Server):
    """kinesalite under node; pid, stop and logs work as for the JVM servers."""

    @property
    def lib_dir(self) -> Path:
        spec = resources.files("services.devstack").joinpath("kinesis", "package.json").read_bytes()
        digest = hashlib.sha256(spec).hexdigest()[:10]
        return self.settings.home / f"kinesalite-{self.version}-{digest}"

    @property
    def cli(self) -> Path:
        return self.lib_dir / "node_modules" / "kinesalite" / "cli.js"

    def resolve(self) -> None:
        """npm install kinesalite into the cache once."""
        marker = self.lib_dir / ".complete"
        if marker.exists():
            return
        npm = self.settings.npm
        if shutil.which(npm) is None:
            raise StackError(f"the Kinesis server needs npm ({npm!r} not found); install Node.js and npm")
        staging = self.lib_dir.with_name(self.lib_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        spec = resources.files("services.devstack").joinpath("kinesis", "package.json")
        with resources.as_file(spec) as spec_path:
            shutil.copyfile(spec_path, staging / "package.json")
        print(f"installing kinesalite {self.version} with npm ...", file=sys.stderr)
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--omit=dev"],
            cwd=staging,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(
                f"npm could not install kinesalite {self.version}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
            )
        shutil.rmtree(self.lib_dir, ignore_errors=True)
        staging.rename(self.lib_dir)
        marker.touch()

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "data").mkdir(exist_ok=True)
        s = self.settings
        cmd = [
            s.node,
            str(self.cli),
            "--host",
            "127.0.0.1",
            "--port",
            str(s.kinesis_port),
            "--path",
            str(self.base / "data"),
            # Stream state changes take 500 ms by default; tests reshard and create streams often.
            "--createStreamMs",
            "50",
            "--deleteStreamMs",
            "50",
            "--updateStreamMs",
            "50",
            # The limit counts open shards over every stream; tests make many small streams.
            "--shardLimit",
            "100000",
        ]
        self.spawn(cmd)


def kinesis_server(settings: StackSettings) -> KinesaliteServer:
    # "kinesalite" is in its command line, and the data folder too: pid() checks both.
    return KinesaliteServer("kinesis", KINESALITE_VERSION, "kinesalite", settings)


def kinesis_answers(settings: StackSettings, timeout_s: float = 3.0) -> bool:
    """True when the server answers a Kinesis API call (an unsigned one: the
    answer, an error about the signature, shows the API is being served)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - a loopback URL built from settings
        settings.kinesis_endpoint,
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "Kinesis_20131202.ListStreams"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):  # noqa: S310
            return True
    except urllib.error.HTTPError as exc:
        return b"__type" in exc.read()
    except (urllib.error.URLError, OSError):
        return False


def start_kinesis(settings: StackSettings) -> tuple[KinesaliteServer, float]:
    """Start kinesalite unless it runs; return it and how long it took to answer."""
    server = kinesis_server(settings)
    server.resolve()
    if server.pid() is None:
        server.start()
    return server, wait_until(server, lambda: kinesis_answers(settings), settings.start_timeout_s)
