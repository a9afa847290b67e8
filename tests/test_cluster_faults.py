"""A worker node removed mid-job on a multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: a head
and two workers, each worker with a custom resource standing in for a GPU, so the scoring actors land on the
workers only). The job must finish with the output of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.config import ModelConfig, validate_config
from pipelines.model.scoring import Scorer
from tests.datasets import make_pairs, read_output, reference_top_n, write_flat

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

TOP_N = 3


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    """A model that takes its time (the simulated accelerator, 60 pairs/s) so that both actors hold units."""
    from tests.tiny_models import build_simulated_accelerator

    return str(build_simulated_accelerator(tmp_path_factory.mktemp("models") / "slow", pairs_per_s=30.0))


@pytest.fixture
def cluster(monkeypatch):
    """Head (the driver's node, no accelerator) + two workers with {"accel": 1}, all on 127.0.0.1, in a private
    Ray temp folder."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # ray.init() would otherwise swap 127.0.0.1 for the machine's outward address when it connects.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)

    tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    workers = [c.add_node(num_cpus=2, resources={"accel": 1}, node_ip_address="127.0.0.1") for _ in range(2)]
    ray.init(address=c.address)
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        subprocess.run(["rm", "-rf", tmp], check=False)


def _config(tmp_path, model: str, src, **scale):
    from pipelines.config import RerankJobConfig

    return validate_config(
        RerankJobConfig,
        {
            "input": {"uri": str(src)},
            "output": {"uri": str(tmp_path / "out"), "top_n": TOP_N},
            "model": {"name_or_path": model, "max_length": 96, "batch_size": 8, "trust_remote_code": True},
            "scale": {"num_actors": 2, "num_cpus_per_actor": 1, "unit_rows": 4, "actor_resources": {"accel": 1}}
            | scale,
        },
    )


def _remove_mid_job(c, workers, lose: int, config, done: Path) -> dict:
    """Run the job in a thread; once both actors have committed units, remove the first `lose` worker nodes and
    wait for the job. Returns {"summary": ...} or {"error": ...}."""
    from pipelines.job import run_rerank

    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_rerank(config)
        except BaseException as err:  # noqa: BLE001 - reported by the tests
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    removed = False
    deadline = time.monotonic() + 240
    while thread.is_alive() and time.monotonic() < deadline:
        records = [json.loads(p.read_text()) for p in done.glob("*.json")] if done.exists() else []
        # Both actors at work (a unit committed from each worker node), so a removed one holds units in flight.
        if len(records) >= 4 and len({r["node"] for r in records}) == 2:
            for node in workers[:lose]:
                # A lost machine takes its processes with it. remove_node stops the node's raylet, but its worker
                # processes outlive it for a while and still answer the driver's direct actor calls, so the actor
                # goes down with the node here, holding its units in flight.
                pids = {r["pid"] for r in records if r["node"] == node.node_id}
                assert pids, "the two nodes with units committed are not the two workers"
                c.remove_node(node, allow_graceful=False)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            removed = True
            break
        time.sleep(0.02)
    thread.join(timeout=400)
    assert removed, f"the job ended before a node could be removed: {result}"
    return result


def _assert_reference_output(tmp_path, model: str, pairs: pd.DataFrame) -> None:
    scores = Scorer(ModelConfig(name_or_path=model, max_length=96, trust_remote_code=True)).score(
        pairs["query"].tolist(), pairs["text"].tolist()
    )
    got, ref = read_output(tmp_path / "out"), reference_top_n(pairs, scores, TOP_N)
    cols = ["query_id", "doc_id", "rank", "first_stage_rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-4)


def test_worker_node_removed_mid_job(cluster, tmp_path, slow_model):
    import ray

    c, workers = cluster
    pairs = make_pairs(num_queries=60, per_query=9, seed=7)
    src = write_flat(pairs, tmp_path / "in", files=3)
    config = _config(tmp_path, slow_model, src)
    result = _remove_mid_job(c, workers, 1, config, tmp_path / "out" / "_work" / "done")
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert 0 <= summary.units_retried <= summary.units  # units in flight on the lost node were redone, once
    assert summary.pairs_in == summary.pairs_scored == len(pairs)
    head = ray.get_runtime_context().get_node_id()
    assert head not in summary.scale["units_by_node"]  # scoring only on the nodes with the resource
    _assert_reference_output(tmp_path, slow_model, pairs)


def test_every_worker_node_lost_then_resumed_on_a_new_one(cluster, tmp_path, slow_model):
    """Both actors' nodes lost and no other node can host them: the job stops after scale.stall_timeout_s with the
    reason instead of waiting forever; once a node is back (as an autoscaler would add one), --resume finishes
    with the output of an uninterrupted run, keeping the units done before."""
    from pipelines.job import JobError, run_rerank

    c, workers = cluster
    pairs = make_pairs(num_queries=60, per_query=9, seed=8)
    src = write_flat(pairs, tmp_path / "in", files=3)
    config = _config(tmp_path, slow_model, src, actor_start_timeout_s=30, stall_timeout_s=30)
    started = time.monotonic()
    result = _remove_mid_job(c, workers, 2, config, tmp_path / "out" / "_work" / "done")
    assert isinstance(result.get("error"), JobError), result
    assert "no unit moved for 30 s (scale.stall_timeout_s): the model actors are gone" in str(result["error"])
    assert "--resume" in str(result["error"]) and "{'accel': 1.0} per model actor" in str(result["error"])
    assert time.monotonic() - started < 120
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    c.add_node(num_cpus=2, resources={"accel": 1}, node_ip_address="127.0.0.1")
    summary = run_rerank(config.model_copy(update={"output": config.output.model_copy(update={"mode": "resume"})}))
    assert summary.units_resumed >= 4 and summary.pairs_in == summary.pairs_scored == len(pairs)
    _assert_reference_output(tmp_path, slow_model, pairs)
