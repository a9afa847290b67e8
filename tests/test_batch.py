"""The batch job end to end on a local Ray: both layouts, the corpus join, rejects, output modes, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ModelConfig, RerankJobConfig
from pipelines.errors import ConfigError, InputError, OutputError
from pipelines.job import plan_rerank, run_rerank
from pipelines.model.scoring import Scorer
from tests.datasets import make_pairs, read_output, reference_top_n, small_job, write_flat, write_packed

pytestmark = pytest.mark.timeout(300)

TOP_N = 4


def job(tmp_path, model, input_uri, **extra) -> RerankJobConfig:
    return small_job(tmp_path, model, input_uri, TOP_N, **extra)


@pytest.fixture(scope="module")
def pairs() -> pd.DataFrame:
    return make_pairs(num_queries=12, per_query=9)


@pytest.fixture(scope="module")
def scores(pairs, tiny_cross_encoder) -> np.ndarray:
    scorer = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96))
    return scorer.score(pairs["query"].tolist(), pairs["text"].tolist())


def check_invariants(out: pd.DataFrame, n: int) -> None:
    for _, group in out.groupby("query_id"):
        assert group["rank"].tolist() == list(range(1, len(group) + 1))
        assert len(group) <= n
        assert (np.diff(group["score"].to_numpy()) <= 0).all()


def assert_matches_reference(out: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert len(out) == len(ref)
    pd.testing.assert_frame_equal(
        out[["query_id", "doc_id", "rank", "first_stage_rank"]].reset_index(drop=True),
        ref[["query_id", "doc_id", "rank", "first_stage_rank"]].reset_index(drop=True),
        check_dtype=False,
    )
    np.testing.assert_allclose(out["score"], ref["score"], atol=1e-4)


def test_flat_layout_spread_over_files(ray_local, tmp_path, tiny_cross_encoder, pairs, scores):
    src = write_flat(pairs, tmp_path / "in", files=3)
    summary = run_rerank(job(tmp_path, tiny_cross_encoder, src))
    out = read_output(tmp_path / "out")
    assert_matches_reference(out, reference_top_n(pairs, scores, TOP_N))
    check_invariants(out, TOP_N)
    schema = pq.read_schema(next((tmp_path / "out").glob("*.parquet")))
    assert schema.field("query_id").type == pa.int64() and schema.field("doc_id").type == pa.int64()
    assert schema.field("score").type == pa.float32() and schema.field("rank").type == pa.int32()
    assert summary.pairs_in == summary.pairs_scored == len(pairs)
    assert summary.queries == pairs["query_id"].nunique() and summary.rows_written == len(out)
    written = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert written["pairs_scored"] == len(pairs) and written["model"]["revision"].startswith("sha256:")
    assert written["model"]["device"] == "cpu" and written["model"]["max_batch_tokens"] == 2048  # the actors'
    assert (tmp_path / "out" / "_SUCCESS").exists()
    stages = ("plan_s", "first_actor_s", "actor_imports_s", "model_load_s", "scoring_s", "reduce_s")
    assert set(written["timings_s"]) == set(stages) and all(written["timings_s"][k] >= 0 for k in stages)
    whole = sum(written["timings_s"][k] for k in ("plan_s", "first_actor_s", "scoring_s", "reduce_s"))
    assert whole <= written["wall_time_s"] + 0.01


def test_a_job_planned_for_a_cluster_is_checked_on_its_actors_device(
    ray_local, tmp_path, tiny_cross_encoder, pairs, monkeypatch
):
    """Under `ray job submit` the plan cannot see the workers' GPUs, so float16 passes it; the actors here get no
    GPU, so the job refuses it before any actor starts."""
    src = write_flat(pairs, tmp_path / "in", files=1)
    config = job(tmp_path, tiny_cross_encoder, src, model__dtype="float16")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    plan = plan_rerank(config)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match="float16 on CPU is not supported"):
        run_rerank(config, plan)
    assert not (tmp_path / "out" / "_work").exists()


def test_packed_layout_with_string_ids_and_rejects(ray_local, tmp_path, tiny_cross_encoder, pairs, scores):
    df = pairs.assign(query_id="q" + pairs["query_id"].astype(str))
    bad_row = df.index[5]
    df.loc[bad_row, "text"] = "   "  # blank passage: rejected, not scored
    src = write_packed(df, tmp_path / "in")
    # A query whose candidate list is empty must be accounted for too.
    pq.write_table(
        pa.table(
            {
                "query_id": ["q-empty"],
                "query": ["heat"],
                "candidates": pa.array([[]], type=pq.read_schema(src / "part-0.parquet").field("candidates").type),
            }
        ),
        src / "part-9.parquet",
    )
    summary = run_rerank(job(tmp_path, tiny_cross_encoder, src))
    out = read_output(tmp_path / "out")
    keep = df.index != bad_row
    ref = reference_top_n(df[keep], scores[keep], TOP_N)
    assert_matches_reference(
        out.sort_values(["query_id", "rank"]).reset_index(drop=True),
        ref.sort_values(["query_id", "rank"]).reset_index(drop=True),
    )
    assert pq.read_schema(next((tmp_path / "out").glob("*.parquet"))).field("query_id").type == pa.string()
    rejects = pq.read_table(tmp_path / "out" / "_rejects").to_pandas()
    assert sorted(rejects["reason"]) == ["empty_text", "no_candidates"]
    assert summary.pairs_in == summary.pairs_scored + summary.rejected == len(df) + 1
    # three small files (and the empty-candidates one) make one unit: small files are combined
    assert summary.scale["reduce_buckets"] == 1 and summary.units == 1


def test_corpus_join_and_missing_docs(ray_local, tmp_path, tiny_cross_encoder, pairs, scores):
    corpus = pairs[["doc_id", "text"]].drop_duplicates("doc_id")
    missing = corpus["doc_id"].iloc[3]
    corpus = corpus[corpus["doc_id"] != missing]
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.Table.from_pandas(corpus, preserve_index=False), tmp_path / "corpus" / "docs.parquet")
    src = write_flat(pairs.drop(columns=["text"]), tmp_path / "in", files=2)
    summary = run_rerank(job(tmp_path, tiny_cross_encoder, src, input__corpus_uri=str(tmp_path / "corpus")))
    keep = (pairs["doc_id"] != missing).to_numpy()
    out = read_output(tmp_path / "out")
    assert_matches_reference(out, reference_top_n(pairs[keep], scores[keep], TOP_N))
    rejects = pq.read_table(tmp_path / "out" / "_rejects").to_pandas()
    assert rejects["detail"].isna().all()  # detail is for model_error rejects
    assert rejects.drop(columns=["detail"]).to_dict("records") == [
        {"query_id": int(pairs.loc[~keep, "query_id"].iloc[0]), "doc_id": int(missing), "reason": "doc_not_in_corpus"}
    ]
    assert summary.rejected_by_reason == {"doc_not_in_corpus": 1}


def test_bad_rows_are_rejected_with_reasons(ray_local, tmp_path, tiny_cross_encoder):
    table = pa.table(
        {
            "query_id": pa.array([1, 1, None, 2, 3, 3], pa.int64()),
            "query": ["heat flow", "heat flow", "x", "", "mach", "mach"],
            "doc_id": pa.array(["a", None, "c", "d", "e", "f"]),
            "text": ["wing", "wing", "wing", "wing", None, "shock wave"],
        }
    )
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "x.parquet")
    summary = run_rerank(job(tmp_path, tiny_cross_encoder, tmp_path / "in"))
    out = read_output(tmp_path / "out")
    assert out[["query_id", "doc_id", "rank"]].to_dict("records") == [
        {"query_id": 1, "doc_id": "a", "rank": 1},
        {"query_id": 3, "doc_id": "f", "rank": 1},
    ]
    rejects = pq.read_table(tmp_path / "out" / "_rejects").to_pandas().sort_values("reason")
    assert rejects["reason"].tolist() == ["empty_query", "empty_text", "missing_doc_id", "missing_query_id"]
    assert summary.pairs_in == 6 and summary.pairs_scored == 2 and summary.rejected == 4


def test_output_mode(ray_local, tmp_path, tiny_cross_encoder, pairs):
    src = write_flat(pairs.head(20), tmp_path / "in", files=1)
    run_rerank(job(tmp_path, tiny_cross_encoder, src))
    with pytest.raises(OutputError, match="output.mode=overwrite"):
        run_rerank(job(tmp_path, tiny_cross_encoder, src))
    (tmp_path / "out" / "part-99999-000.parquet").write_bytes(b"left by someone")
    run_rerank(job(tmp_path, tiny_cross_encoder, src, output__mode="overwrite", output__top_n=1))
    assert not (tmp_path / "out" / "part-99999-000.parquet").exists()  # old files are gone, not mixed in
    assert read_output(tmp_path / "out")["rank"].max() == 1
    with pytest.raises(OutputError, match="overlaps the input"):
        run_rerank(job(tmp_path, tiny_cross_encoder, src, output__uri=str(src), output__mode="overwrite"))


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"query_id": [1], "doc_id": [1], "text": ["t"]}), "missing column 'query'"),
        (pa.table({"query_id": [1], "query": ["q"], "doc_id": [1]}), "no text in the table"),
        (
            pa.table({"query_id": [1.5], "query": ["q"], "doc_id": [1], "text": ["t"]}),
            "query_id must be an integer or string",
        ),
        (pa.table({"query_id": [1], "query": ["q"], "candidates": [["a"]]}), "candidates must be list<struct"),
    ],
)
def test_unusable_input_is_named(tmp_path, tiny_cross_encoder, table, message):
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "x.parquet")
    with pytest.raises(InputError, match=message):
        run_rerank(job(tmp_path, tiny_cross_encoder, tmp_path / "in"))


def test_no_files_and_mismatched_files(tmp_path, tiny_cross_encoder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files found"):
        run_rerank(job(tmp_path, tiny_cross_encoder, tmp_path / "empty"))
    with pytest.raises(InputError, match="input not found"):
        run_rerank(job(tmp_path, tiny_cross_encoder, tmp_path / "nowhere"))
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"query_id": [1], "query": ["q"], "doc_id": [1], "text": ["t"]}), tmp_path / "in" / "a.parquet"
    )
    pq.write_table(
        pa.table({"query_id": ["x"], "query": ["q"], "doc_id": [1], "text": ["t"]}), tmp_path / "in" / "b.parquet"
    )
    with pytest.raises(InputError, match="does not match"):
        run_rerank(job(tmp_path, tiny_cross_encoder, tmp_path / "in"))
    (tmp_path / "in" / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read Parquet schema of .*b.parquet"):
        run_rerank(job(tmp_path, tiny_cross_encoder, tmp_path / "in"))


def test_glob_and_file_names(ray_local, tmp_path, tiny_cross_encoder, pairs, scores):
    src = write_flat(pairs, tmp_path / "in", files=2)
    (src / "notes.txt").write_text("not matched by the glob")
    run_rerank(job(tmp_path, tiny_cross_encoder, f"{src}/part-*.parquet"))
    assert_matches_reference(read_output(tmp_path / "out"), reference_top_n(pairs, scores, TOP_N))
    (src / "part-0.parquet").rename(src / "part-0.pq")
    with pytest.raises(InputError, match=r"part-0.pq does not end in .parquet"):
        run_rerank(job(tmp_path, tiny_cross_encoder, f"{src}/part-*", output__mode="overwrite"))


def test_extra_columns_may_differ_between_files(ray_local, tmp_path, tiny_cross_encoder, pairs, scores):
    """Only the job's columns are read: a column it ignores may have another type in each file."""
    src = tmp_path / "in"
    src.mkdir()
    half = len(pairs) // 2
    for i, (part, meta) in enumerate([(pairs.iloc[:half], 1), (pairs.iloc[half:], "x")]):
        pq.write_table(pa.Table.from_pandas(part.assign(meta=meta), preserve_index=False), src / f"p{i}.parquet")
    run_rerank(job(tmp_path, tiny_cross_encoder, src))
    assert_matches_reference(read_output(tmp_path / "out"), reference_top_n(pairs, scores, TOP_N))
