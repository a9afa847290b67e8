"""The engine: the job's Ray Data stages on a node that declares a GPU (a simulated accelerator), and the public
Ray Data API (`rerank_dataset`) on the same stages."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.config import ModelConfig
from pipelines.job import run_rerank
from pipelines.model.scoring import Scorer
from tests.datasets import make_pairs, read_output, reference_top_n, small_job, write_flat
from tests.tiny_models import build_simulated_accelerator

pytestmark = pytest.mark.timeout(300)

TOP_N = 3
RATE = 2000.0  # pairs/s of the simulated accelerator


@pytest.fixture(scope="module")
def ray_gpu():
    """An in-process Ray whose one node declares a GPU (Ray accepts declared GPUs on a CPU machine)."""
    import ray

    from tests.ray_cluster import start_local_ray

    start_local_ray(num_gpus=1)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> str:
    return str(build_simulated_accelerator(tmp_path_factory.mktemp("models") / "simulated", RATE))


def test_model_stage_on_the_gpu_node_the_cluster_declares(ray_gpu, tmp_path, simulated):
    """Default scale settings: the model actor takes the node's GPU (never falls back to CPU), the CPU stage
    tokenises beside it, and the output equals the in-process Scorer's top-N."""
    pairs = make_pairs(num_queries=40, per_query=25, seed=3)
    src = write_flat(pairs, tmp_path / "in", files=4)
    config = small_job(
        tmp_path,
        simulated,
        src,
        TOP_N,
        model__trust_remote_code=True,
        model__batch_size=64,
        scale__unit_rows=100,
        scale__num_actors="auto",
        scale__num_cpus_per_actor=0.5,
    )
    summary = run_rerank(config)
    assert summary.scale["num_gpus_per_actor"] == 1.0 and summary.model["device"] == "cuda"
    assert summary.pairs_in == summary.pairs_scored == len(pairs) and summary.units == 12
    scores = Scorer(ModelConfig(name_or_path=simulated, trust_remote_code=True, max_length=96)).score(
        pairs["query"].tolist(), pairs["text"].tolist()
    )
    got, ref = read_output(tmp_path / "out"), reference_top_n(pairs, scores, TOP_N)
    cols = ["query_id", "doc_id", "rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-6)
    rate = summary.pairs_scored / summary.timings_s["scoring_s"]
    print(f"simulated accelerator R = {RATE:.0f} pairs/s: scoring phase {rate:.0f} pairs/s ({rate / RATE:.2f} R)")


def test_rerank_dataset_scores_pairs_and_ranks_packed_rows(ray_gpu, tiny_cross_encoder):
    import ray

    from pipelines.engine.dataset_api import rerank_dataset

    pairs = make_pairs(num_queries=8, per_query=6, seed=5)
    model = {"name_or_path": tiny_cross_encoder, "max_length": 96}
    scale = {"num_gpus_per_actor": 0, "num_cpus_per_actor": 0.5}
    ref = Scorer(ModelConfig(**model)).score(pairs["query"].tolist(), pairs["text"].tolist())

    scored = rerank_dataset(ray.data.from_pandas(pairs), model, scale=scale, rows_per_batch=10).to_pandas()
    merged = pairs.assign(ref=ref).merge(scored[["query_id", "doc_id", "score"]], on=["query_id", "doc_id"])
    assert len(merged) == len(pairs)
    np.testing.assert_allclose(merged["score"], merged["ref"], atol=1e-5)

    packed = (
        pairs.groupby("query_id", sort=True)
        .apply(lambda g: pd.Series({"query": g["query"].iloc[0], "candidates": g[["doc_id", "text"]].to_dict("records")}))
        .reset_index()
    )
    ranked = rerank_dataset(
        ray.data.from_pandas(packed), model, top_n=TOP_N, candidates="candidates", scale=scale
    ).to_pandas()
    expected = reference_top_n(pairs, ref, TOP_N)
    assert len(ranked) == packed.shape[0]
    for _, row in ranked.iterrows():
        want = expected[expected["query_id"] == row["query_id"]].sort_values("rank")
        got = list(row["candidates"])
        assert [c["doc_id"] for c in got] == want["doc_id"].tolist()
        assert [c["rank"] for c in got] == list(range(1, len(got) + 1))
        np.testing.assert_allclose([c["score"] for c in got], want["score"], atol=1e-5)
        assert set(got[0]) == {"doc_id", "text", "score", "rank"}
    json.dumps(ranked.iloc[0]["query"])  # plain values, not Arrow objects
