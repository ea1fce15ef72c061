"""One server of the dev stack as a process: its jars (resolved by Maven once),
its pid, log and data folder under the stack's data folder, start, stop and kill."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.devstack.stack import StackSettings


class StackError(RuntimeError):
    """A dev-stack server could not be resolved, started or stopped."""


@dataclass
class Server:
    """One JVM server of the dev stack."""

    name: str
    version: str
    main_class: str
    settings: StackSettings
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def lib_dir(self) -> Path:
        # Keyed by the pom's content too: a changed dependency list resolves afresh.
        pom = resources.files("services.devstack").joinpath(self.name, "pom.xml").read_bytes()
        digest = hashlib.sha256(pom).hexdigest()[:10]
        return self.settings.home / f"{self.name}-{self.version}-{digest}" / "lib"

    @property
    def base(self) -> Path:
        return self.settings.data / self.name

    @property
    def pid_file(self) -> Path:
        return self.base / "server.pid"

    @property
    def log_file(self) -> Path:
        return self.base / "server.log"

    # -- jars -----------------------------------------------------------------

    def resolve(self) -> None:
        """Copy the server's jars and their dependencies into the cache once."""
        marker = self.lib_dir / ".complete"
        if marker.exists():
            return
        pom = resources.files("services.devstack").joinpath(self.name, "pom.xml")
        staging = self.lib_dir.with_name("lib.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with resources.as_file(pom) as pom_path:
            cmd = [
                self.settings.mvn,
                "-q",
                "-B",
                "-f",
                str(pom_path),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ]
            print(f"resolving {self.name} {self.version} with Maven ...", file=sys.stderr)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise StackError(
                f"Maven could not resolve {self.name} {self.version}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
            )
        shutil.rmtree(self.lib_dir, ignore_errors=True)
        staging.rename(self.lib_dir)
        marker.touch()

    # -- process --------------------------------------------------------------

    def pid(self) -> int | None:
        """The pid of this server's JVM if it is running, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        child = _children.get(pid)
        if child is not None:
            # Started by this process: ask Popen (the JVM may not have exec'd yet).
            return pid if child.poll() is None else None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        # A recycled pid that belongs to another program does not count.
        if self.main_class.encode() not in cmdline or str(self.base).encode() not in cmdline:
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None
        return pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])

    def launch(self, jvm_args: Sequence[str], program_args: Sequence[str]) -> int:
        self.base.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.settings.java,
            *jvm_args,
            "-cp",
            f"{self.lib_dir}/*",
            f"-Dheadwater.stack.base={self.base}",
            self.main_class,
            *program_args,
        ]
        return self.spawn(cmd)

    def spawn(self, cmd: Sequence[str]) -> int:
        """Start ``cmd`` detached (its own session) in the server's folder, output to its
        log, and record its pid; the servers that are not plain JVMs start through this too."""
        self.base.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.base,
            )
        finally:
            log.close()
        _children[proc.pid] = proc
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def stop(self) -> bool:
        """Ask the JVM to shut down cleanly; kill it after the stop timeout."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.stop_timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            _reap(pid)
            time.sleep(0.2)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
            while self.pid() is not None:
                _reap(pid)
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the server at once (for failure tests)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            while self.pid() is not None:
                _reap(pid)
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)


# Servers this process started; kept so they can be reaped once they exit.
_children: dict[int, subprocess.Popen[bytes]] = {}
children = _children  # the same map, for the non-JVM servers (services/devstack/kinesis.py)


def _reap(pid: int) -> None:
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        del _children[pid]


def wait_until(server: Server, probe: Callable[[], bool], timeout_s: float) -> float:
    """Poll ``probe`` until it answers; raise with the log tail if the JVM dies."""
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if server.pid() is None:
            raise StackError(f"{server.name} exited while starting:\n{server.log_tail()}")
        if probe():
            return time.monotonic() - started
        time.sleep(0.5)
    raise StackError(f"{server.name} did not answer within {timeout_s:.0f}s:\n{server.log_tail()}")


def rss_mib(pid: int | None) -> int:
    """A process's resident memory in MiB (0 when it is not running)."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return 0
    return 0
