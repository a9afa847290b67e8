"""A real multi-node Ray cluster on one machine: a head and worker nodes started with `ray start --block` as
separate processes, all on 127.0.0.1.

Two nodes on one host collide on Ray's default ports, so every component of every node gets its own free port:
GCS, dashboard, node manager, object manager, metrics export, dashboard agent (HTTP and gRPC), runtime env agent,
the Ray client server and a worker-port range. Each node has its own --temp-dir (so nothing is written to
/tmp/ray, not even ray_current_cluster). Teardown kills only this cluster's processes, by PID: the `ray start`
processes' groups and every process whose command line names this cluster's temp dir. Never `ray stop`, which
stops every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.ports import _RANGE

RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int, contiguous: bool = False) -> list[int]:
    """n ports that bind on 127.0.0.1 now (contiguous: a range), outside Ray's and the kernel's own ranges."""
    rng = random.Random()
    for _ in range(500):
        if contiguous:
            base = rng.randrange(_RANGE[0], _RANGE[1] - n)
            candidates = list(range(base, base + n))
        else:
            candidates = rng.sample(range(*_RANGE), n)
        if all(_bindable(p) for p in candidates):
            return candidates
    raise RuntimeError("no free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, however it dies (Linux), so a killed
    pytest never leaves a cluster behind; `ray start --block` then stops its own processes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path


@dataclass
class LocalCluster:
    root: Path
    env: dict[str, str]
    token: str | None = None
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    _taken: set[int] = field(default_factory=set)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _ports(self, n: int, contiguous: bool = False) -> list[int]:
        while True:
            ports = _free_ports(n, contiguous)
            if not self._taken & set(ports):
                self._taken |= set(ports)
                return ports

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Node:
        (
            node_manager,
            object_manager,
            metrics,
            agent_http,
            agent_grpc,
            runtime_env_agent,
            client_server,
        ) = self._ports(7)
        workers = self._ports(40, contiguous=True)
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True)
        log = self.root / f"{name}.log"
        cmd = [
            RAY,
            "start",
            "--block",
            # Ray swaps a loopback node IP for the host's own address (its multi-node rule on Linux); nothing
            # leaves the machine either way, and the dashboard binds 127.0.0.1.
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            f"--ray-client-server-port={client_server}",
            f"--min-worker-port={workers[0]}",
            f"--max-worker-port={workers[-1]}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
            "--log-style=record",
            *args,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, before any thread of ours starts
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        node = Node(name, proc, temp_dir, log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: float = 1) -> None:
        self.gcs_port, self.dashboard_port = self._ports(2)
        self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
            ],
        )
        self.wait_nodes(1, timeout=120)

    def add_worker(self, num_cpus: float = 2, resources: dict[str, float] | None = None) -> None:
        self._start(
            f"worker{len(self.nodes)}",
            [
                f"--address={self.gcs_address}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--resources={json.dumps(resources or {})}",
            ],
        )

    def alive_nodes(self) -> list[dict]:
        r = requests.get(f"{self.dashboard_url}/api/v0/nodes?limit=100&detail=1", headers=self.headers, timeout=10)
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited:\n{node.log.read_text()[-3000:]}")
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= n:
                    return nodes
            except (requests.RequestException, KeyError) as err:
                last = err
            time.sleep(1.0)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout} s ({last})")

    def actors(self) -> list[dict]:
        r = requests.get(f"{self.dashboard_url}/api/v0/actors?limit=1000&detail=1", headers=self.headers, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def _own_pids(self) -> set[int]:
        """The `ray start` processes, their descendants (raylets, GCS, workers, job drivers) and anything else whose
        command line names this cluster's temp dir."""
        import psutil

        marker = str(self.root)
        pids = set()
        for node in self.nodes:
            try:
                pids |= {c.pid for c in psutil.Process(node.proc.pid).children(recursive=True)}
            except psutil.Error:
                pass
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(marker in part for part in p.info["cmdline"] or ()):
                    pids.add(p.info["pid"])
            except (psutil.Error, TypeError):
                continue
        return pids

    def stop(self) -> None:
        """Kill this cluster's processes only: SIGTERM, then SIGKILL what is left."""
        import psutil

        groups = [n.proc.pid for n in self.nodes]
        pids = self._own_pids() | set(groups)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        for pid in self._own_pids():  # started meanwhile (e.g. a worker process being spawned)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for n in self.nodes:
            try:
                n.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def start_local_ray(num_cpus: int = 4, num_gpus: int = 0) -> None:
    """An in-process Ray for one test module, on loopback only: more logical CPUs than cores, so actors never
    starve the read tasks on a 2-core machine; `num_gpus` declared (none need be there). The caller shuts it
    down."""
    import ray

    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
