"""End to end against a real S3 protocol server (moto) on 127.0.0.1: s3:// in, s3:// out."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipelines.config import ModelConfig, RerankJobConfig, validate_config
from pipelines.errors import InputError
from pipelines.job import run_rerank
from pipelines.model.scoring import Scorer
from tests.datasets import make_pairs, reference_top_n
from tests.ray_cluster import start_local_ray

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """Ray starts after AWS_ENDPOINT_URL is set, as it would for a user, so its workers inherit it."""
    import ray

    start_local_ray()
    yield s3_server
    ray.shutdown()


@pytest.fixture(scope="module")
def bucket(s3_ray):
    fs = s3fs.S3FileSystem(endpoint_url=s3_ray, key="testing", secret="testing")
    fs.mkdir("rerank-test")
    return fs


def put_table(fs, path, df):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())


def read_table(fs, folder) -> pd.DataFrame:
    files = [p for p in fs.find(folder) if p.endswith(".parquet") and "/_" not in p[len(folder) :]]
    frames = [pq.read_table(io.BytesIO(fs.cat(p))).to_pandas() for p in files]
    return pd.concat(frames).sort_values(["query_id", "rank"]).reset_index(drop=True)


def test_s3_in_s3_out_with_corpus_join(bucket, s3_ray, tiny_cross_encoder):
    pairs = make_pairs(num_queries=8, per_query=6, seed=3)
    shuffled = pairs.sample(frac=1.0, random_state=0)
    for i in range(3):
        put_table(bucket, f"rerank-test/cands/part-{i}.parquet", shuffled.iloc[i::3].drop(columns=["text"]))
    put_table(bucket, "rerank-test/corpus/docs.parquet", pairs[["doc_id", "text"]])
    cfg = validate_config(
        RerankJobConfig,
        {
            "input": {"uri": "s3://rerank-test/cands/", "corpus_uri": "s3://rerank-test/corpus"},
            "output": {"uri": "s3://rerank-test/out", "top_n": 3},
            "model": {"name_or_path": tiny_cross_encoder, "max_length": 96},
            "scale": {"num_actors": 1, "num_cpus_per_actor": 0.5},
            # The endpoint also comes from AWS_ENDPOINT_URL; naming it here checks the config path.
            "storage": {"endpoint_url": s3_ray},
        },
    )
    summary = run_rerank(cfg)
    out = read_table(bucket, "rerank-test/out")
    scores = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96)).score(
        pairs["query"].tolist(), pairs["text"].tolist()
    )
    ref = reference_top_n(pairs, scores, 3)
    assert out[["query_id", "doc_id", "rank"]].values.tolist() == ref[["query_id", "doc_id", "rank"]].values.tolist()
    np.testing.assert_allclose(out["score"], ref["score"], atol=1e-4)
    assert bucket.exists("rerank-test/out/_SUCCESS")
    written = json.loads(bucket.cat("rerank-test/out/_summary.json"))
    assert written["rows_written"] == len(ref) == summary.rows_written and written["rejected"] == 0


def test_packed_from_s3_using_environment_only(bucket, s3_ray, tiny_cross_encoder):
    pairs = make_pairs(num_queries=5, per_query=4, seed=4, str_query_ids=True)
    packed = [
        {"query_id": q, "query": g["query"].iloc[0], "candidates": g[["doc_id", "text"]].to_dict("records")}
        for q, g in pairs.groupby("query_id")
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(packed), buf)
    bucket.pipe("rerank-test/packed/q.parquet", buf.getvalue())
    cfg = validate_config(
        RerankJobConfig,
        {
            "input": {"uri": ["s3://rerank-test/packed/q.parquet"]},
            "output": {"uri": "s3://rerank-test/out-packed", "top_n": 2},
            "model": {"name_or_path": tiny_cross_encoder, "max_length": 96},
            "scale": {"num_actors": 1, "num_cpus_per_actor": 0.5},
        },
    )
    summary = run_rerank(cfg)
    out = read_table(bucket, "rerank-test/out-packed")
    sizes = pairs.groupby("query_id").size()
    assert len(out) == sum(min(2, n) for n in sizes) and summary.queries == 5
    assert out.groupby("query_id")["rank"].apply(list).tolist() == [list(range(1, min(2, n) + 1)) for n in sizes]


def test_missing_bucket_is_a_clear_error(s3_ray, tiny_cross_encoder):
    cfg = validate_config(
        RerankJobConfig,
        {
            "input": {"uri": "s3://no-such-bucket/x/"},
            "output": {"uri": "s3://rerank-test/never"},
            "model": {"name_or_path": tiny_cross_encoder},
        },
    )
    with pytest.raises(InputError, match="no-such-bucket"):
        run_rerank(cfg)


def test_whole_job_survives_transient_s3_faults(bucket, s3_ray, s3_fault_proxy, tiny_cross_encoder):
    """Throttling, 500s and connection resets on listings, reads and writes (from the driver, the actors and
    the reduce tasks alike) are retried: the job's output is that of a job without faults."""
    pairs = make_pairs(num_queries=8, per_query=6, seed=9)
    for i in range(2):
        put_table(bucket, f"rerank-test/flaky-in/part-{i}.parquet", pairs.iloc[i::2])
    cfg = validate_config(
        RerankJobConfig,
        {
            "input": {"uri": "s3://rerank-test/flaky-in/"},
            "output": {"uri": "s3://rerank-test/flaky-out", "top_n": 3},
            "model": {"name_or_path": tiny_cross_encoder, "max_length": 96},
            "scale": {"num_actors": 1, "num_cpus_per_actor": 0.5, "unit_rows": 10},
            "storage": {"endpoint_url": s3_fault_proxy.endpoint},
        },
    )
    faults = [
        s3_fault_proxy.inject("slowdown", times=2, method="PUT"),
        s3_fault_proxy.inject("internal", times=2, method="GET", path=r"flaky-in/part-1"),
        s3_fault_proxy.inject("reset", times=2, method="GET", path=r"_work/partial"),
        s3_fault_proxy.inject("slowdown", times=1, method="GET", path=r"list-type|prefix="),
    ]
    summary = run_rerank(cfg)
    assert all(f.injected >= 1 for f in faults), [f.injected for f in faults]
    out = read_table(bucket, "rerank-test/flaky-out")
    scores = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96)).score(
        pairs["query"].tolist(), pairs["text"].tolist()
    )
    ref = reference_top_n(pairs, scores, 3)
    assert out[["query_id", "doc_id", "rank"]].values.tolist() == ref[["query_id", "doc_id", "rank"]].values.tolist()
    assert summary.pairs_in == summary.pairs_scored == len(pairs)
    s3_fault_proxy.clear()
