"""A fake autoscaling Ray cluster on one machine, on loopback only, for tests.

A head started with ``ray start --head --autoscaling-config=...`` whose config names the ``fake_multinode`` node
provider (``RAY_FAKE_CLUSTER=1``): its autoscaler (Ray's v1 monitor on the head) launches each "node" as a local Ray
node process tree (raylet and agents) joined to the head, with the resources of its node type; it removes idle ones
after ``idle_timeout_minutes``. Worker node types start at zero, as on our cluster.yaml or a KubeRay group with
``minReplicas: 0``, so a job that wants GPUs sees none until the autoscaler adds a node::

    from tests.autoscaling_cluster import AutoscalingCluster

    with AutoscalingCluster(tmp_path, head_resources={"CPU": 2},
                            worker_node_types={"gpu": {"resources": {"CPU": 2, "GPU": 1}, "max_workers": 2}}) as c:
        c.connect()          # ray.init(address=c.address) on loopback; c.disconnect() or the exit shuts it down
        ...                  # nodes come up as demand asks: c.wait_nodes(n), c.alive_nodes()

Why not ``ray.cluster_utils.AutoscalingCluster``: its ``start()`` runs ``ray stop --force`` (every Ray on the machine,
other tests' included), its head listens on every interface, and it reads
``autoscaler/_private/fake_multi_node/example.yaml``, which the wheel lacks. Here:

- The config is written whole (the v1 autoscaler reads the file as is; nothing fills in defaults from example.yaml).
  The autoscaler v2 (``RAY_enable_autoscaler_v2=1``) runs the config through ``prepare_config``, which opens that
  missing file, so v2 cannot start from the wheel: this harness is v1 only.
- Everything stays on 127.0.0.1: the head is started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's
  single-machine rule: a loopback node address is kept, not swapped for the host's outward one, so the GCS and every
  other server bind loopback), and the fake provider launches its nodes from the head's monitor process, which
  inherits that, at ``provider.gcs_address`` (set to the head's loopback address; its default is the host's address
  and port 6379). The driver side does the same through `connect` (``_node_ip_address`` and Ray's constant).
- The head gets its own free ports and its own ``--temp-dir`` (tests/ray_cluster.py's `LocalCluster`, reused here);
  the nodes the autoscaler adds take the head's temp dir (Ray's rule for a non-head node). Nothing is written to
  /tmp/ray, not ``ray_current_cluster`` either, and `connect` always passes the address explicitly.
- `stop` kills only this cluster's processes (LocalCluster.stop: the ``ray start`` process group, its descendants,
  which include the autoscaler and the nodes it launched, and whatever else names this cluster's temp dir). Never
  ``ray stop``. A killed pytest takes the head down with it (PR_SET_PDEATHSIG on ``ray start --block``).
- Token authentication is off (``RAY_AUTH_MODE=disabled``) and HOME is the cluster's folder: nothing is read from
  or written to the real ~/.ray.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tests.ports import port_open
from tests.ray_cluster import LocalCluster

HEAD_NODE_TYPE = "ray.head.default"  # the name the fake provider gives the head
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"

GPU_WORKER = {"gpu": {"resources": {"CPU": 2, "GPU": 1}, "min_workers": 0, "max_workers": 2, "node_config": {}}}


def autoscaling_config(
    head_resources: dict[str, float],
    worker_node_types: dict[str, dict[str, Any]],
    gcs_address: str,
    *,
    max_workers: int | None = None,
    idle_timeout_minutes: float = 1.0,
    upscaling_speed: float = 1.0,
) -> dict[str, Any]:
    """A complete fake-multinode autoscaling config (the v1 autoscaler fills in no defaults)."""
    types = {}
    for name, spec in worker_node_types.items():
        spec = copy.deepcopy(spec)
        spec.setdefault("node_config", {})
        spec.setdefault("min_workers", 0)
        spec.setdefault("max_workers", 1)
        spec["resources"] = {"object_store_memory": 100_000_000, **spec.get("resources", {})}  # not 30% of RAM
        types[name] = spec
    types[HEAD_NODE_TYPE] = {"resources": dict(head_resources), "node_config": {}, "min_workers": 0, "max_workers": 0}
    if max_workers is None:
        max_workers = sum(int(t["max_workers"]) for n, t in types.items() if n != HEAD_NODE_TYPE)
    return {
        "cluster_name": "fake-autoscaling",
        "max_workers": max_workers,
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            # Several nodes share 127.0.0.1: the autoscaler tells them apart by node id (the fake provider's node
            # ids are the "IPs" it reports), as Ray's own example config does.
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class AutoscalingCluster(LocalCluster):
    """A head with the given resources and an autoscaler that adds nodes of `worker_node_types` (autoscaler node
    type specs: ``resources``, ``min_workers`` (default 0), ``max_workers`` (default 1), ``node_config``)."""

    def __init__(
        self,
        root: Path | str | None = None,
        head_resources: dict[str, float] | None = None,
        worker_node_types: dict[str, dict[str, Any]] | None = None,
        *,
        idle_timeout_minutes: float = 1.0,
        max_workers: int | None = None,
        env: dict[str, str] | None = None,
    ):
        if root is None:
            root = tempfile.mkdtemp(prefix="ac-", dir="/tmp")  # short: socket paths must fit in 107 characters
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        base.update(
            HOME=str(root),
            RAY_FAKE_CLUSTER="1",
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
        )
        base.update(env or {})
        super().__init__(root=root, env=base)
        self.head_resources = dict(head_resources if head_resources is not None else {"CPU": 2})
        self.worker_node_types = copy.deepcopy(worker_node_types if worker_node_types is not None else GPU_WORKER)
        self.idle_timeout_minutes = idle_timeout_minutes
        self.max_workers = max_workers
        self.config_path = root / "autoscaling.yaml"
        self._connected = False

    @property
    def address(self) -> str:
        return self.gcs_address

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_path.read_text())

    def start(self, timeout: float = 120) -> AutoscalingCluster:
        self.gcs_port, self.dashboard_port = self._ports(2)
        config = autoscaling_config(
            self.head_resources,
            self.worker_node_types,
            self.gcs_address,
            max_workers=self.max_workers,
            idle_timeout_minutes=self.idle_timeout_minutes,
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        head = dict(self.head_resources)
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--autoscaling-config={self.config_path}",
            "--include-dashboard=false",  # Ray still runs a minimal one (usage stats): on a port of ours, loopback
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={head.pop('CPU', 0)}",
            f"--num-gpus={head.pop('GPU', 0)}",
        ]
        if head:
            args.append(f"--resources={json.dumps(head)}")
        node = self._start("head", args)
        deadline = time.monotonic() + timeout
        gcs = None
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:  # `ray start --block` ends when the autoscaler (or any part) dies
                raise RuntimeError(f"ray head exited:\n{node.log.read_text(errors='replace')[-3000:]}")
            try:
                started = gcs is None and "Ray runtime started" in node.log.read_text(errors="replace")
                if started and port_open(self.gcs_port):  # not a GCS going down: GcsClient would wait 30 s
                    from ray._raylet import GcsClient

                    gcs = GcsClient(address=self.gcs_address)
                # The autoscaler runs once it has published a status (every AUTOSCALER_UPDATE_INTERVAL_S).
                if gcs is not None and gcs.internal_kv_get(b"__autoscaling_status", None):
                    return self
            except Exception:  # noqa: BLE001 - the head went down meanwhile: its exit is reported above
                gcs = None
            time.sleep(0.5)
        raise TimeoutError(
            f"ray head or its autoscaler not up after {timeout} s:\n{node.log.read_text(errors='replace')[-3000:]}"
            f"\nmonitor.log:\n{self.monitor_log()[-3000:]}"
        )

    # ------------------------------------------------------------------------------------------ the driver

    def connect(self, **kwargs):
        """``ray.init`` to this cluster from this process, on loopback: with Ray's multi-node rule on, the driver
        would take the host's outward address and find no raylet there."""
        import ray
        from ray._private import ray_constants

        self._saved_rule = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.setdefault("log_to_driver", False)
        kwargs.setdefault("configure_logging", False)
        info = ray.init(address=self.address, _node_ip_address="127.0.0.1", **kwargs)
        self._connected = True
        return info

    def disconnect(self) -> None:
        import ray
        from ray._private import ray_constants

        if self._connected:
            ray.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = self._saved_rule
            self._connected = False

    def alive_nodes(self) -> list[dict]:
        """Ray's view of the live nodes (``ray.nodes()``), through the driver: `connect` first."""
        import ray

        return [n for n in ray.nodes() if n.get("Alive")]

    def worker_nodes(self) -> list[dict]:
        """Live nodes other than the head."""
        return [n for n in self.alive_nodes() if n["NodeID"] != FAKE_HEAD_NODE_ID and not _is_head(n)]

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.alive_nodes()
            if len(nodes) >= n:
                return nodes
            if self.nodes[0].proc.poll() is not None:
                raise RuntimeError(f"ray head exited:\n{self.nodes[0].log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout} s")

    def monitor_log(self) -> str:
        """The autoscaler's log (``monitor.log`` of the head's session), for failure messages."""
        logs = sorted(self.root.glob("head/session_*/logs/monitor.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    def stop(self) -> None:
        try:
            self.disconnect()
        finally:
            super().stop()

    def __enter__(self) -> AutoscalingCluster:  # noqa: PYI034
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _is_head(node: dict) -> bool:
    return any(k.startswith("node:__internal_head__") for k in node.get("Resources", {}))
