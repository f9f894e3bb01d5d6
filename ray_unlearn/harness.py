"""What the tests, the benchmarks, the demo and sweep trials share: free local ports, a Ray
head of our own, and a seeded pick of owners to delete.

Kept once here (it was copied into each benchmark and test) and inside the package, so
``benchmarks/*.py`` (run as scripts), ``tests/`` and ``ray_unlearn.train`` / ``tune`` import
it the same way. It belongs to the Ray layer, not to ``platform/``: it starts Ray processes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ray_unlearn.platform.core.plan import TEST

if TYPE_CHECKING:
    from ray_unlearn.platform.core.run import RunContext

__all__ = ["LocalRayHead", "free_port", "pick_owners", "processes_of"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(temp_dir: str) -> list[int]:
    """Pids (other than this one) whose command line names ``temp_dir``: every process of a
    head started with that session directory."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                if temp_dir.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


class LocalRayHead:
    """``ray start --head --block`` on 127.0.0.1 as a child process in its own process group,
    every port picked free, its own short session directory under /tmp (Ray's socket paths
    are capped in length). :meth:`stop` signals that group and then any process that still
    names the session directory: it ends this cluster only (``ray stop`` would end every Ray
    on the machine, other sessions' included).

    Args:
        num_cpus: CPUs the head offers.
        dashboard: run the dashboard (on 127.0.0.1; ``ray job submit`` needs it) or not.
        env: the head's environment (default: this process's).
        extra_args: more ``ray start`` flags.
        prefix: the session directory's name prefix.

    After :meth:`start`: ``address`` (GCS, ``127.0.0.1:port``), ``dashboard_url`` (or
    None), ``start_s``, ``auth`` (token authentication on), ``node_ip`` (the IP Ray
    reports, which may replace 127.0.0.1), ``failures`` (why earlier attempts failed).
    """

    def __init__(
        self,
        *,
        num_cpus: int = 2,
        dashboard: bool = False,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        prefix: str = "rh",
    ):
        self.num_cpus = num_cpus
        self.dashboard = dashboard
        self.env = dict(os.environ if env is None else env)
        self.extra_args = list(extra_args)
        self.prefix = prefix
        self.proc: subprocess.Popen | None = None
        self.temp_dir = ""
        self.address = ""
        self.dashboard_url: str | None = None
        self.start_s = float("nan")
        self.auth = False
        self.node_ip: str | None = None
        self.failures: list[str] = []

    @property
    def log(self) -> Path:
        return Path(self.temp_dir) / "ray_start.log"

    def _command(self) -> list[str]:
        port, dash = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        self.dashboard_url = f"http://127.0.0.1:{dash}" if self.dashboard else None
        ports = {
            "--port": port,
            "--ray-client-server-port": free_port(),
            "--dashboard-port": dash,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
        cmd += [f"--num-cpus={self.num_cpus}", "--disable-usage-stats"]
        cmd += ["--dashboard-host=127.0.0.1"] if self.dashboard else ["--include-dashboard=false"]
        cmd += [*self.extra_args, f"--temp-dir={self.temp_dir}"]
        return cmd + [f"{k}={v}" for k, v in ports.items()]

    def _attempt(self, timeout: float) -> str | None:
        """One start on fresh ports and a fresh session directory; None once Ray says it
        runs, else why not."""
        self.temp_dir = tempfile.mkdtemp(prefix=self.prefix, dir="/tmp")
        self.proc = subprocess.Popen(
            self._command(),
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
        )
        t0 = time.monotonic()
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None:
                return f"ray start exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            if time.monotonic() - t0 > timeout:
                return f"not started after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)
        self.start_s = time.monotonic() - t0
        text = self.log.read_text()
        # `ray start` warns about token auth only when it turns it on implicitly (token file).
        self.auth = (
            self.env.get("RAY_AUTH_MODE") == "token" or "Token authentication is enabled" in text
        )
        m = re.search(r"Local node IP.*?(\d+\.\d+\.\d+\.\d+)", text)
        self.node_ip = m.group(1) if m else None
        return None

    def start(self, timeout: float = 90.0, attempts: int = 1) -> LocalRayHead:
        """Start the head, waiting up to ``timeout`` seconds per attempt. On a loaded machine
        ``ray start`` can fail by itself (the raylet has a fixed 30 s to register with the
        GCS), so a failed attempt is stopped, cleaned and retried on fresh ports and a fresh
        session directory, up to ``attempts`` in all; RuntimeError with every reason when
        none starts."""
        for _ in range(attempts):
            why = self._attempt(timeout)
            if why is None:
                return self
            self.failures.append(why)
            self.stop()
        raise RuntimeError(
            f"ray start --head failed {attempts} time(s):\n" + "\n---\n".join(self.failures)
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the head's own process group (``ray start --block``, GCS, raylet,
        dashboard, workers), SIGKILL to that group after ``grace_s`` seconds, then SIGKILL to
        any process that left the group but names this session; the session directory is
        removed. Nothing else is signalled."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)  # `ray start --block` itself waits ~30 s for stragglers
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
            proc.wait()
        deadline = time.time() + 15
        while processes_of(self.temp_dir) and time.time() < deadline:
            time.sleep(0.5)
        for pid in processes_of(self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def pick_owners(ctx: RunContext, n: int, seed: int) -> list[str]:
    """``n`` owners with training data that may be deleted, chosen by a seeded draw (rows a
    method declares not subject to deletion, such as S3T's public split: their owners are
    left out)."""
    from ray_unlearn.platform.methods import registry

    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
    protected = set(registry.undeletable_ids(ctx).tolist())
    if protected:
        owners = np.array(
            [o for o in owners if not set(ctx.plan.samples_of_owner(o).tolist()) & protected]
        )
    rng = np.random.default_rng(seed)
    return [str(o) for o in rng.choice(owners, size=min(n, len(owners)), replace=False)]
