"""GPUs on an autoscaling cluster whose GPU nodes start at zero: `cluster_gpus` reads what the autoscaler can add,
and Ray Data's GPU actor pools on such a cluster (tests/autoscaling_cluster.py: a fake autoscaling cluster on
loopback, its autoscaler adding local "GPU nodes", i.e. nodes that advertise {"GPU": 1}; no real GPU is used).

The unit tests at the top fake each source of `cluster_gpus`; the cluster tests (slow) share one cluster:
head {"CPU": 2} (no GPU), node type "gpu" {"CPU": 2, "GPU": 1} min 0 max 2, node type "gpu_x" {"CPU": 2,
"GPU": 1, "X": 1} max 0 (a type that exists but can never be added)."""

from __future__ import annotations

import json
import logging
import math
import time
from types import SimpleNamespace

import pytest

from pipelines.engine import ray_runtime
from pipelines.engine.ray_runtime import cluster_gpus, gpus_from_autoscaling_config, gpus_from_cluster_config

# ---------------------------------------------------------------------------------------------- parsing


def _cluster_config(groups, max_resources=None):
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in groups:
        group = config.node_group_configs.add()
        group.name = name
        group.max_count = max_count
        for k, v in resources.items():
            group.resources[k] = v
    for k, v in (max_resources or {}).items():
        config.max_resources[k] = v
    return config


def test_gpus_from_cluster_config():
    assert gpus_from_cluster_config(None) is None
    assert gpus_from_cluster_config(_cluster_config([])) is None
    assert gpus_from_cluster_config(_cluster_config([("cpu", {"CPU": 8}, 10)])) == 0
    groups = [("cpu", {"CPU": 8}, 10), ("a10", {"CPU": 4, "GPU": 1}, 8), ("h100", {"CPU": 96, "GPU": 8}, 2)]
    assert gpus_from_cluster_config(_cluster_config(groups)) == 24
    assert gpus_from_cluster_config(_cluster_config(groups, {"GPU": 10})) == 10
    assert gpus_from_cluster_config(_cluster_config([("a10", {"GPU": 1}, -1)])) == math.inf
    assert gpus_from_cluster_config(_cluster_config([("a10", {"GPU": 1}, -1)], {"GPU": 16})) == 16
    assert gpus_from_cluster_config(_cluster_config([("a10", {"GPU": 1}, 0)])) == 0


def test_gpus_from_autoscaling_config():
    from pathlib import Path

    import yaml

    ours = yaml.safe_load((Path(__file__).resolve().parent.parent / "cluster.yaml").read_text())
    assert gpus_from_autoscaling_config(ours) == 8  # gpu_worker: GPU 1, max_workers 8; head CPU only
    head = {"resources": {"CPU": 4}}
    assert gpus_from_autoscaling_config({}) is None
    assert gpus_from_autoscaling_config({"available_node_types": {"h": head}, "head_node_type": "h"}) == 0
    types = {"h": {"resources": {"CPU": 4, "GPU": 1}}, "g1": {"resources": {"GPU": 1}, "max_workers": 4}}
    assert gpus_from_autoscaling_config({"available_node_types": types, "head_node_type": "h"}) == 5
    # The top-level max_workers caps the worker count (filled GPU-richest first) and is a type's default.
    types = {
        "h": head,
        "g1": {"resources": {"GPU": 1}, "max_workers": 4},
        "g8": {"resources": {"GPU": 8}, "max_workers": 2},
        "cpu": {"resources": {"CPU": 8}, "max_workers": 10},
    }
    assert gpus_from_autoscaling_config({"available_node_types": types, "head_node_type": "h", "max_workers": 3}) == 17
    types = {"h": head, "g": {"resources": {"GPU": 2}}}
    assert gpus_from_autoscaling_config({"available_node_types": types, "head_node_type": "h", "max_workers": 3}) == 6
    assert gpus_from_autoscaling_config({"available_node_types": types, "head_node_type": "h"}) == math.inf
    types = {"h": head, "g": {"max_workers": 5, "node_config": {}}}  # resources left to the provider: unknown
    assert gpus_from_autoscaling_config({"available_node_types": types, "head_node_type": "h"}) == 0


class _Proc:
    def __init__(self, cmdline, cwd="/home/ray"):
        self.info = {"cmdline": cmdline}
        self._cwd = cwd

    def cwd(self):
        return self._cwd


def _fake_ray(monkeypatch, gpus_now=0.0, gcs="10.0.0.5:6379", cluster_config=None):
    import ray
    from ray._private import state

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": gpus_now} if gpus_now else {"CPU": 4})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address=gcs))

    def get_cluster_config():
        if isinstance(cluster_config, Exception):
            raise cluster_config
        return cluster_config

    monkeypatch.setattr(state.state, "get_cluster_config", get_cluster_config)


def _fake_processes(monkeypatch, procs):
    import importlib

    import ray  # noqa: F401 - puts Ray's own psutil on the path

    psutil = importlib.import_module("psutil")
    monkeypatch.setattr(psutil, "process_iter", lambda attrs=None: iter(procs))


MONITOR = "/venv/lib/python3.11/site-packages/ray/autoscaler/_private/monitor.py"
MONITOR_V2 = "/venv/lib/python3.11/site-packages/ray/autoscaler/v2/monitor.py"


def test_cluster_gpus_sources(monkeypatch, tmp_path):
    config = tmp_path / "bootstrap.yaml"
    config.write_text(
        json.dumps(
            {
                "max_workers": 8,
                "head_node_type": "head",
                "available_node_types": {
                    "head": {"resources": {"CPU": 0}},
                    "gpu_worker": {"resources": {"CPU": 4, "GPU": 1}, "min_workers": 0, "max_workers": 3},
                },
            }
        )
    )
    other_cluster = _Proc(["python", "-u", MONITOR, "--gcs-address=10.0.0.5:6380", "--autoscaling-config=/nope"])
    ours = _Proc(
        ["python", "-u", MONITOR, "--logs-dir=/x", "--gcs-address=10.0.0.5:6379", f"--autoscaling-config={config}"]
    )

    # 3. No source: what is up now.
    _fake_ray(monkeypatch, gpus_now=0, cluster_config=RuntimeError("Ray has not been started yet"))
    _fake_processes(monkeypatch, [_Proc(["bash"]), _Proc([]), other_cluster])
    assert cluster_gpus() == (0.0, 0.0)
    _fake_ray(monkeypatch, gpus_now=2, cluster_config=None)
    assert cluster_gpus() == (2.0, 2.0)
    # A fixed-size cluster's monitor has no config file.
    _fake_processes(monkeypatch, [_Proc(["python", "-u", MONITOR_V2, "--gcs-address=10.0.0.5:6379"])])
    assert cluster_gpus() == (2.0, 2.0)

    # 2. The local autoscaler's config file, found by this cluster's GCS port.
    _fake_processes(monkeypatch, [other_cluster, ours])
    _fake_ray(monkeypatch, gpus_now=0, cluster_config=None)
    assert ray_runtime.local_autoscaling_config_path() == config
    assert cluster_gpus() == (0.0, 3.0)
    _fake_ray(monkeypatch, gpus_now=1, cluster_config=_cluster_config([]))  # a config without node groups: skipped
    assert cluster_gpus() == (1.0, 3.0)
    relative = _Proc(["python", MONITOR_V2, "--gcs-address=10.0.0.5:6379", "--autoscaling-config=bootstrap.yaml"])
    _fake_processes(monkeypatch, [relative])
    relative._cwd = str(tmp_path)
    assert cluster_gpus() == (1.0, 3.0)
    _fake_processes(monkeypatch, [_Proc(["python", MONITOR, "--gcs-address=h:6379", "--autoscaling-config=/nope"])])
    assert cluster_gpus() == (1.0, 1.0)  # unreadable file: no source

    # 1. The cluster config in the GCS comes first.
    _fake_processes(monkeypatch, [ours])
    _fake_ray(monkeypatch, gpus_now=0, cluster_config=_cluster_config([("g", {"GPU": 4}, 5)]))
    assert cluster_gpus() == (0.0, 20.0)
    _fake_ray(monkeypatch, gpus_now=3, cluster_config=_cluster_config([("cpu", {"CPU": 4}, 5)]))
    assert cluster_gpus() == (3.0, 3.0)  # never less than what is up


def test_cluster_gpus_needs_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="needs Ray initialised"):
        cluster_gpus()
    assert ray_runtime.local_autoscaling_config_path() is None


def test_replica_gpus_from_what_the_cluster_can_add(monkeypatch):
    import ray

    from pipelines.config import ServeAppConfig, validate_config
    from pipelines.serve.app import replica_gpus

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    config = validate_config(ServeAppConfig, {"model": {"name_or_path": "m"}})
    try:
        for gpus, want in [((0.0, 2.0), 1.0), ((0.0, math.inf), 1.0), ((0.0, 0.0), 0.0), ((1.0, 1.0), 1.0)]:
            monkeypatch.setattr(ray_runtime, "cluster_gpus", lambda gpus=gpus: gpus)
            records.clear()
            assert replica_gpus(config) == want, gpus
            said = [r.getMessage() for r in records if "autoscaler can add" in r.getMessage()]
            assert bool(said) == (gpus[0] == 0 and gpus[1] > 0), (gpus, said)
            if said:
                assert ("no upper bound" if math.isinf(gpus[1]) else "up to 2 GPUs") in said[0]
    finally:
        logger.removeHandler(handler)
    cpu = validate_config(ServeAppConfig, {"model": {"name_or_path": "m", "device": "cpu"}})
    assert replica_gpus(cpu) == 0.0


# ---------------------------------------------------------------------------------------------- a cluster

WORKER_TYPES = {
    "gpu": {"resources": {"CPU": 2, "GPU": 1}, "min_workers": 0, "max_workers": 2},
    "gpu_x": {"resources": {"CPU": 2, "GPU": 1, "X": 1}, "min_workers": 0, "max_workers": 0},
}


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    from tests.autoscaling_cluster import AutoscalingCluster

    root = tmp_path_factory.mktemp("ac")  # short: Ray's socket paths must fit in 107 characters
    c = AutoscalingCluster(root, head_resources={"CPU": 2}, worker_node_types=WORKER_TYPES, idle_timeout_minutes=1)
    with c:
        c.connect()
        yield c
    assert not c._own_pids()


class _Where:
    """Records where each batch ran, and sleeps, standing in for a GPU model."""

    def __init__(self, sleep_s: float):
        import os

        import ray

        ctx = ray.get_runtime_context()
        self.sleep_s = sleep_s
        self.pid = os.getpid()
        self.node = ctx.get_node_id()
        self.gpus = ",".join(ctx.get_accelerator_ids().get("GPU", []))

    def __call__(self, batch):
        started = time.time()
        time.sleep(self.sleep_s)
        n = len(batch["id"])
        return batch | {"pid": [self.pid] * n, "node": [self.node] * n, "gpus": [self.gpus] * n, "t": [started] * n}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cluster_gpus_sees_the_gpu_node_type_before_any_gpu_node(autoscaling):
    import ray

    assert ray.cluster_resources().get("GPU", 0) == 0 and not autoscaling.worker_nodes()
    assert ray_runtime.local_autoscaling_config_path() == autoscaling.config_path
    assert cluster_gpus() == (0.0, 2.0)  # "gpu": 1 GPU x max 2; "gpu_x": max 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_actor_pool_grows_onto_nodes_the_autoscaler_adds(autoscaling, record_property):
    """A GPU actor pool (min 1, max 2) on a cluster with no GPU node up: Ray's autoscaler adds a GPU node for the
    first actor's demand; Ray Data asks for a second GPU bundle once the pool is busy, the autoscaler adds a second
    node, and the pool grows to 2 actors, each on its own GPU node, none on the head. The dataset is longer than
    needed (400 batches of 1 s): the test stops reading once the second actor has scored a batch."""
    import threading

    import ray

    head = next(n["NodeID"] for n in autoscaling.alive_nodes() if "node:__internal_head__" in n["Resources"])
    assert not autoscaling.worker_nodes()
    nodes_up: dict[str, tuple[float, float]] = {}  # node id -> (seconds after the start when first seen, its GPUs)
    done = threading.Event()
    start = time.time()

    def watch() -> None:
        while not done.is_set():
            for n in autoscaling.worker_nodes():
                nodes_up.setdefault(n["NodeID"], (round(time.time() - start, 1), n["Resources"].get("GPU", 0)))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ds = ray.data.range(400, override_num_blocks=400).map_batches(
        _Where,
        fn_constructor_args=(1.0,),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        num_gpus=1,
        num_cpus=0.5,
        batch_size=1,
    )
    rows, first = [], {}
    try:
        for row in ds.iter_rows():
            rows.append(row)
            first.setdefault((row["pid"], row["node"]), round(row["t"] - start, 1))
            if len(first) == 2 or time.time() - start > 240:
                break
    finally:
        done.set()
        watcher.join()
    took = time.time() - start
    assert all(r["node"] != head for r in rows)
    assert all(r["gpus"] for r in rows)  # each actor was given a GPU id
    assert len(first) == 2, (first, nodes_up)  # the pool reached 2 actors
    assert len({node for _, node in first}) == 2  # on two GPU nodes
    assert all(nodes_up[node][1] == 1 for _, node in first)
    timeline = {"nodes_up_s": sorted(t for t, _ in nodes_up.values()), "first_batch_s": sorted(first.values())}
    record_property("timeline", timeline)
    print(f"pool of 2 after {took:.1f} s: {timeline}")


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "resources",
    [{"X": 1}, {"accelerator_type:H100": 0.001}],
    ids=["node-type-with-max-0", "no-node-type"],
)
def test_gpu_actor_pool_that_no_node_type_can_host_fails_after_the_wait(autoscaling, resources):
    """wait_for_min_actors_s > 0: the operator's start waits that long for its min_size actors, then fails."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = 5
    try:
        ds = ray.data.range(4, override_num_blocks=4).map_batches(
            _Where,
            fn_constructor_args=(0.1,),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
            num_gpus=1,
            num_cpus=0.5,
            resources=resources,
            batch_size=1,
        )
        start = time.monotonic()
        with pytest.raises(ray.exceptions.GetTimeoutError) as err:
            ds.take_all()
        waited = time.monotonic() - start
    finally:
        ctx.wait_for_min_actors_s = saved
    assert str(err.value) == (
        "Timed out while starting actors. This may mean that the cluster does not have enough resources for the "
        "requested actor pool."
    )
    assert isinstance(err.value.__context__, ray.exceptions.GetTimeoutError)  # ray.get's own, in start()
    assert 5 <= waited < 60, waited


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cluster_config_in_the_gcs_comes_first(autoscaling):
    """Where an autoscaler publishes its node types in the GCS (Ray's ClusterConfig key), that is read first."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    config = _cluster_config([("gpu8", {"CPU": 96, "GPU": 8}, 3)])
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)
    try:
        now, most = cluster_gpus()
        assert most == max(now, 24.0)
    finally:
        _internal_kv_del(key, namespace=namespace)
    assert cluster_gpus()[1] == 2.0


# ---------------------------------------------------------------------------------------------- the batch job on it


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_scores_on_the_gpu_nodes_the_autoscaler_adds(autoscaling, tmp_path):
    """Default scale settings on a cluster whose GPU nodes start at zero: the model actors take GPUs (from the node
    types, not what is up), run only on the GPU nodes the autoscaler adds, the pool grows to 2, and the output
    equals the in-process Scorer's top-N (what a single actor gives)."""
    import numpy as np
    import pandas as pd

    from pipelines.config import ModelConfig
    from pipelines.job import run_rerank
    from pipelines.model.scoring import Scorer
    from tests.datasets import make_pairs, read_output, reference_top_n, small_job, write_flat
    from tests.tiny_models import build_simulated_accelerator

    sim = str(build_simulated_accelerator(tmp_path / "sim", pairs_per_s=25.0))
    pairs = make_pairs(num_queries=100, per_query=20, seed=11)
    src = write_flat(pairs, tmp_path / "in", files=10)
    config = small_job(
        tmp_path,
        sim,
        src,
        3,
        model__trust_remote_code=True,
        scale__num_actors="auto",
        scale__num_cpus_per_actor=1.0,
        scale__unit_rows=20,
        scale__actor_start_timeout_s=240,
    )
    summary = run_rerank(config)
    workers = autoscaling.worker_nodes()
    heads = {n["NodeID"] for n in autoscaling.alive_nodes()} - {n["NodeID"] for n in workers}
    gpu_nodes = {n["NodeID"] for n in workers if n["Resources"].get("GPU")}
    assert summary.scale["num_gpus_per_actor"] == 1.0 and summary.scale["max_actors"] == 2
    by_node = summary.scale["units_by_node"]
    assert not heads & set(by_node) and set(by_node) <= gpu_nodes, (by_node, gpu_nodes)
    assert len(by_node) == 2, by_node  # the pool grew onto a second GPU node
    assert summary.pairs_in == summary.pairs_scored == len(pairs)
    scores = Scorer(ModelConfig(name_or_path=sim, trust_remote_code=True, max_length=96)).score(
        pairs["query"].tolist(), pairs["text"].tolist()
    )
    got, ref = read_output(tmp_path / "out"), reference_top_n(pairs, scores, 3)
    cols = ["query_id", "doc_id", "rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_whose_gpus_never_come_says_what_it_lacked(autoscaling, tmp_path, tiny_cross_encoder):
    from pipelines.job import JobError, run_rerank
    from tests.datasets import make_pairs, small_job, write_flat

    src = write_flat(make_pairs(num_queries=4, per_query=5), tmp_path / "in", files=1)
    config = small_job(
        tmp_path,
        tiny_cross_encoder,
        src,
        3,
        scale__num_actors="auto",
        scale__accelerator_type="H100",
        scale__actor_start_timeout_s=10,
    )
    started = time.monotonic()
    with pytest.raises(JobError, match=r"no model actor started within 10 s: the cluster lacks .*1 GPU.* on H100"):
        run_rerank(config)
    assert time.monotonic() - started < 120
