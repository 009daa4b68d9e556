"""A Ray cluster of separate raylets on this machine (`ray start --head` plus `ray start --address`
per worker node), for the scale benchmark and the multi-node tests, and stopping exactly it: every
process under its temp dir, never `ray stop` (which ends every Ray instance of the user)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(extra: dict | None = None) -> dict:
    """The environment every node (and so every worker and job) of the cluster gets: this checkout
    importable, no token auth (local only), quiet."""
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
               RAY_TRAIN_ENABLE_PRINT_PATCH="0", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
               PYTHONPATH=os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]))
    env.update(extra or {})
    return env


def _table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def ray_workers() -> dict[int, str]:
    """pid → process title (`ray::<task or actor method>`) of every Ray worker process on the machine."""
    return {pid: cmd.split(" ", 1)[0] for pid, (_, cmd) in _table().items() if cmd.startswith("ray::")}


def processes(marker: str) -> set[int]:
    """Every process whose command line contains `marker`, and all their descendants."""
    table = _table()
    found = {pid for pid, (_, cmd) in table.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in found} - found - {os.getpid()}
        grew = bool(children)
        found |= children
    return found


def kill_tree(marker: str, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL, every process of `processes(marker)`. Returns how many were signalled."""
    doomed = processes(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in doomed):
            time.sleep(0.2)
    return len(doomed)


def _agent_ports() -> list[str]:
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


class LocalCluster:
    """`with LocalCluster(head_cpus=0, workers=[1, 1], dashboard=True) as c:` — a head node and one
    raylet per entry of `workers` (its CPUs), each with its own object store; `c.address` is the
    GCS address (`--address` of the stages), `c.dashboard` the job server's URL."""

    def __init__(self, head_cpus: int = 2, workers: list[int] = (), dashboard: bool = False,
                 object_store_mb: int | None = None, env: dict | None = None, resources: bool = True):
        self.temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")    # short: Ray's socket paths must fit
        self.cwd = Path(self.temp) / "cwd"                          # where the nodes (and jobs without a
        self.cwd.mkdir()                                            # working dir) run
        self.head_cpus, self.workers, self.with_dashboard = head_cpus, list(workers), dashboard
        self.store = [f"--object-store-memory={object_store_mb * 2 ** 20}"] if object_store_mb else []
        self.env = environment(env)
        self.ray = str(Path(sys.executable).parent / "ray")
        self.port, self.dashboard_port = free_port(), free_port()
        self.resources = resources
        self.node_raylets: list[int | None] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str]) -> None:
        proc = subprocess.run([self.ray, "start", *args, "--disable-usage-stats"], env=self.env, cwd=self.cwd,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")

    def start(self) -> "LocalCluster":
        head = ["--head", f"--num-cpus={self.head_cpus}", f"--port={self.port}", f"--temp-dir={self.temp}",
                "--node-ip-address=127.0.0.1", f"--ray-client-server-port={free_port()}", *_agent_ports(), *self.store]
        if self.resources:
            head.append('--resources={"head": 1}')
        head += (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
                 if self.with_dashboard else ["--include-dashboard=false"])
        try:
            self._start(head)
            for i in range(len(self.workers)):
                self.node_raylets.append(None)
                self.start_node(i)
        except BaseException:
            self.stop()
            raise
        return self

    def _raylets(self) -> set[int]:
        table = _table()
        return {pid for pid in processes(self.temp) if "/raylet " in table.get(pid, (0, ""))[1]}

    def start_node(self, i: int) -> None:
        """(Re)start worker node i: its own raylet, object store and `worker<i>` resource."""
        before = self._raylets()
        extra = [f'--resources={{"worker{i}": 1}}'] if self.resources else []
        self._start([f"--address={self.address}", f"--num-cpus={self.workers[i]}", "--node-ip-address=127.0.0.1",
                     *_agent_ports(), *self.store, *extra])
        new = self._raylets() - before
        self.node_raylets[i] = min(new) if new else None

    def kill_node(self, i: int) -> int:
        """SIGKILL worker node i's raylet and every process under it (its workers and agents), as a
        machine that fails would; returns how many processes were killed."""
        pid = self.node_raylets[i]
        if pid is None:
            raise RuntimeError(f"worker node {i} is not running")
        table = _table()
        doomed, grew = {pid}, True
        while grew:
            children = {p for p, (pp, _) in table.items() if pp in doomed} - doomed
            grew = bool(children)
            doomed |= children
        for p in doomed:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.node_raylets[i] = None
        return len(doomed)

    def stop(self) -> None:
        kill_tree(self.temp)

    def __enter__(self) -> "LocalCluster":
        # `kill <benchmark>` (SIGTERM) would end Python without unwinding and leave the raylets and
        # GCS running: raise SystemExit instead, so that __exit__ stops them (main thread only)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def worker_processes(self) -> dict[int, str]:
        """pid → process title of the cluster's Ray worker processes (tasks and actors), on every node."""
        workers = ray_workers()
        return {pid: workers[pid] for pid in processes(self.temp) if pid in workers}
