"""The dev stack's optional Prometheus: Debian's package (``apt-get install prometheus``).

Our own process of ``/usr/bin/prometheus`` (not the Debian service, which the
package would start with its own config), with its config, data and log under
the stack's data folder like the other servers. It loads Headwater's alert
rules from the repo (``compose/prometheus/rules``, the same files compose/'s
Prometheus mounts) and finds what to scrape by file-based service discovery:
every JSON file in ``<data>/prometheus/targets/`` is a list of target groups,
re-read every few seconds, so ``headwater run`` writes the services it starts
there (``write_targets``) and removes them when it stops. A target group's
``job`` label names the service, as the compose jobs do, which is what the
rules and dashboards select on.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import yaml

from services.devstack.server import Server, StackError, wait_until
from services.devstack.stack import StackSettings

# The repo's alert rules (an editable install: the dev stack runs from the repo).
RULES_DIR = Path(__file__).resolve().parent.parent.parent / "compose" / "prometheus" / "rules"


@dataclass
class PrometheusServer(Server):
    """/usr/bin/prometheus; pid, stop and logs work as for the JVM servers."""

    @property
    def targets_dir(self) -> Path:
        return self.base / "targets"

    @property
    def config_file(self) -> Path:
        return self.base / "prometheus.yml"

    def resolve(self) -> None:
        """Nothing to download: the binary comes from Debian's package."""
        if shutil.which(self.settings.prometheus) is None:
            raise StackError(
                f"Prometheus needs Debian's prometheus package ({self.settings.prometheus!r} not "
                "found): apt-get install prometheus"
            )

    def config(self, rules: Sequence[Path], scrape_interval_s: float, evaluation_interval_s: float) -> str:
        port = self.settings.prometheus_port
        return yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": f"{scrape_interval_s:g}s",
                    "evaluation_interval": f"{evaluation_interval_s:g}s",
                    "scrape_timeout": f"{min(scrape_interval_s, 10):g}s",
                },
                "rule_files": [str(path) for path in rules],
                "scrape_configs": [
                    {
                        "job_name": "headwater",
                        "file_sd_configs": [{"files": [str(self.targets_dir / "*.json")], "refresh_interval": "2s"}],
                    },
                    {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
                ],
            },
            sort_keys=False,
        )

    def start_with(self, rules: Sequence[Path], scrape_interval_s: float, evaluation_interval_s: float) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(exist_ok=True)
        self.config_file.write_text(self.config(rules, scrape_interval_s, evaluation_interval_s))
        cmd = [
            self.settings.prometheus,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.base / 'data'}",
            "--storage.tsdb.retention.time=3d",
            f"--web.listen-address=127.0.0.1:{self.settings.prometheus_port}",
            # Debian's defaults point at its own console folders; ours has none.
            f"--web.console.templates={self.base}",
            f"--web.console.libraries={self.base}",
        ]
        self.spawn(cmd)


@functools.cache
def _version(binary: str) -> str:
    """2.42.0 from "prometheus, version 2.42.0+ds (branch: ...)"; "?" when it does not say."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        if shutil.which(binary):
            done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
            return (done.stdout or done.stderr).split()[2].split("+")[0]
    return "?"


def prometheus_server(settings: StackSettings) -> PrometheusServer:
    # "prometheus" is in its command line, and the data folder too: pid() checks both.
    return PrometheusServer("prometheus", _version(settings.prometheus), "prometheus", settings)


def prometheus_url(settings: StackSettings) -> str:
    return f"http://127.0.0.1:{settings.prometheus_port}"


def prometheus_answers(settings: StackSettings, timeout_s: float = 3.0) -> bool:
    """True once Prometheus says it is ready (its TSDB opened, rules loaded)."""
    try:
        with urllib.request.urlopen(f"{prometheus_url(settings)}/-/ready", timeout=timeout_s) as resp:  # noqa: S310 - loopback
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_prometheus(
    settings: StackSettings,
    *,
    rules: Sequence[Path] | None = None,
    scrape_interval_s: float = 5.0,
    evaluation_interval_s: float = 5.0,
) -> tuple[PrometheusServer, float]:
    """Start Prometheus unless it runs; return it and how long it took to answer.
    ``rules`` defaults to every file of the repo's compose/prometheus/rules."""
    server = prometheus_server(settings)
    server.resolve()
    if server.pid() is None:
        files = sorted(RULES_DIR.glob("*.yml")) if rules is None else list(rules)
        server.start_with(files, scrape_interval_s, evaluation_interval_s)
    return server, wait_until(server, lambda: prometheus_answers(settings), settings.start_timeout_s)


def write_targets(settings: StackSettings, name: str, jobs: Mapping[str, Sequence[str]]) -> Path:
    """Write one file-SD file (job -> host:port targets); Prometheus picks it up within seconds.
    Written whole under a temporary name and renamed, so it is never read half-written."""
    server = prometheus_server(settings)
    server.targets_dir.mkdir(parents=True, exist_ok=True)
    path = server.targets_dir / f"{name}.json"
    groups = [{"targets": list(targets), "labels": {"job": job}} for job, targets in jobs.items()]
    staging = path.with_suffix(".json.partial")
    staging.write_bytes(orjson.dumps(groups, option=orjson.OPT_INDENT_2))
    staging.replace(path)
    return path


def remove_targets(settings: StackSettings, name: str) -> None:
    (prometheus_server(settings).targets_dir / f"{name}.json").unlink(missing_ok=True)
