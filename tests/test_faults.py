"""Issue 7 on one local Ray: bad input answered row by row or in one line, duplicates, a scoring actor killed
mid-job, a model that cannot load, and the job's own accounting."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ModelConfig, RerankJobConfig
from pipelines.errors import InputError, OutputError
from pipelines.job import JobError, run_rerank
from pipelines.model.scoring import Scorer
from tests.datasets import make_pairs, read_output, reference_top_n, small_job, write_flat

pytestmark = pytest.mark.timeout(300)

TOP_N = 3


def job(tmp_path, model, input_uri, **extra) -> RerankJobConfig:
    return small_job(tmp_path, model, input_uri, TOP_N, **({"scale__unit_rows": 10} | extra))


@pytest.fixture(scope="module")
def pairs() -> pd.DataFrame:
    return make_pairs(num_queries=16, per_query=9, seed=3)


@pytest.fixture(scope="module")
def scores(pairs, tiny_cross_encoder) -> np.ndarray:
    return Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96)).score(
        pairs["query"].tolist(), pairs["text"].tolist()
    )


def assert_same(out: pd.DataFrame, ref: pd.DataFrame) -> None:
    cols = ["query_id", "doc_id", "rank", "first_stage_rank"]
    pd.testing.assert_frame_equal(out[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(out["score"], ref["score"], atol=1e-4)


def test_duplicate_pairs_take_one_slot(ray_local, tmp_path, tiny_cross_encoder, pairs, scores):
    """A pair repeated in the same file and in another file is ranked once; the copies are rejected."""
    best = pairs.assign(score=scores).sort_values("score", ascending=False).groupby("query_id").head(1)
    copies = pd.concat([best, best.head(3)])  # each query's best pair twice more, three of them three times
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pandas(pairs, preserve_index=False), src / "a.parquet")
    pq.write_table(
        pa.Table.from_pandas(pd.concat([copies, copies.head(2)]).drop(columns="score"), preserve_index=False),
        src / "b.parquet",
    )
    summary = run_rerank(job(tmp_path, tiny_cross_encoder, src))
    out = read_output(tmp_path / "out")
    assert not out.duplicated(["query_id", "doc_id"]).any()
    assert_same(out, reference_top_n(pairs, scores, TOP_N))
    extra = len(copies) + 2
    assert summary.rejected_by_reason == {"duplicate": extra}
    assert summary.pairs_in == len(pairs) + extra == summary.pairs_scored + summary.rejected
    rejects = pq.read_table(tmp_path / "out" / "_rejects").to_pandas()
    assert len(rejects) == extra and set(rejects["reason"]) == {"duplicate"}


def test_rows_that_cannot_be_scored_are_rejected(ray_local, tmp_path, tiny_cross_encoder):
    bad_utf8 = pa.Array.from_buffers(pa.string(), 1, pa.array([b"wing \xff\xfe flow"], pa.binary()).buffers())
    texts = pa.concat_arrays([pa.array(["heat flow", "mach", "x" * 2000, "shock", None], pa.string()), bad_utf8])
    table = pa.table(
        {
            "query_id": pa.array([1, 1, 1, 2, 2, 2], pa.int64()),
            "query": ["heat", "heat", "heat", "mach", "mach", "mach"],
            "doc_id": pa.array([10, 11, 12, 20, 21, 22], pa.int64()),
            "text": texts,
        }
    )
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(table, src / "x.parquet")
    pq.write_table(table.schema.empty_table(), src / "empty.parquet")  # a zero-row file among good ones
    summary = run_rerank(job(tmp_path, tiny_cross_encoder, src, input__max_text_bytes=1000))
    out = read_output(tmp_path / "out")
    assert sorted(out["doc_id"]) == [10, 11, 20]
    assert summary.rejected_by_reason == {"empty_text": 1, "invalid_utf8": 1, "text_too_long": 1}
    rejects = pq.read_table(tmp_path / "out" / "_rejects").to_pandas().sort_values("doc_id")
    assert rejects["doc_id"].tolist() == [12, 21, 22]


def test_zero_row_input_alone(ray_local, tmp_path, tiny_cross_encoder):
    src = tmp_path / "in"
    src.mkdir()
    schema = pa.schema(
        [("query_id", pa.int64()), ("query", pa.string()), ("doc_id", pa.int64()), ("text", pa.string())]
    )
    pq.write_table(schema.empty_table(), src / "empty.parquet")
    summary = run_rerank(job(tmp_path, tiny_cross_encoder, src))
    assert summary.pairs_in == summary.queries == summary.rows_written == 0
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert pq.read_table(tmp_path / "out").num_rows == 0  # an empty result file, readable as a table


def test_output_inside_or_equal_to_input_is_refused(tmp_path, tiny_cross_encoder, pairs):
    src = write_flat(pairs, tmp_path / "in", files=1)
    for out in (src / "out", src):
        with pytest.raises(OutputError, match="overlaps the input"):
            run_rerank(job(tmp_path, tiny_cross_encoder, src, output__uri=str(out)))


def test_output_that_cannot_be_written_is_found_before_scoring(tmp_path, tiny_cross_encoder, pairs):
    src = write_flat(pairs, tmp_path / "in", files=1)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write .*a-file/out"):
        run_rerank(job(tmp_path, tiny_cross_encoder, src, output__uri=str(tmp_path / "a-file" / "out")))


def test_corpus_with_duplicate_doc_ids_is_refused(ray_local, tmp_path, tiny_cross_encoder, pairs):
    src = write_flat(pairs.drop(columns=["text"]), tmp_path / "in", files=1)
    corpus = pairs[["doc_id", "text"]].drop_duplicates("doc_id")
    (tmp_path / "corpus").mkdir()
    pq.write_table(
        pa.Table.from_pandas(pd.concat([corpus, corpus.head(1)]), preserve_index=False),
        tmp_path / "corpus" / "c.parquet",
    )
    with pytest.raises(InputError, match=f"doc_id {corpus['doc_id'].iloc[0]} more than once"):
        run_rerank(job(tmp_path, tiny_cross_encoder, src, input__corpus_uri=str(tmp_path / "corpus")))


def test_corrupt_data_page_is_one_line(ray_local, tmp_path, tiny_cross_encoder, pairs):
    src = write_flat(pairs, tmp_path / "in", files=1)
    path = src / "part-0.parquet"
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for i in range(8, len(data) - footer - 8, 7):  # the pages, not the footer: the plan still reads the schema
        data[i] = (data[i] + 111) % 256
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"cannot read rows .* of .*part-0.parquet") as err:
        run_rerank(job(tmp_path, tiny_cross_encoder, src))
    assert "\n" not in str(err.value)


def test_model_that_cannot_load_fails_fast(ray_local, tmp_path, tiny_cross_encoder, pairs):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_cross_encoder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    src = write_flat(pairs, tmp_path / "in", files=1)
    started = time.monotonic()
    with pytest.raises(JobError, match="the scoring actor could not start: .*Error"):
        run_rerank(job(tmp_path, str(broken), src))
    assert time.monotonic() - started < 120
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def _score_worker_pids() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("ModelStage" in part for part in (p.info["cmdline"] or []))
    ]


def test_scoring_actor_killed_mid_job(ray_local, tmp_path, tiny_cross_encoder, pairs, scores):
    """SIGKILL one scoring actor after some units committed: the job finishes, identical to a clean run, with
    counts that do not double the retried units."""
    big = pd.concat([pairs.assign(query_id=pairs["query_id"] + 100 * i) for i in range(6)], ignore_index=True)
    big_scores = np.tile(scores, 6)
    src = write_flat(big, tmp_path / "in", files=3)
    done_dir = tmp_path / "out" / "_work" / "done"
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_rerank(job(tmp_path, tiny_cross_encoder, src, scale__unit_rows=6))
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        records = [json.loads(p.read_text()) for p in done_dir.glob("*.json")] if done_dir.exists() else []
        if len(records) >= 5:
            # An actor that has committed a unit is past start-up, so it holds units in flight (115 remain).
            killed = records[-1]["pid"]
            assert killed in _score_worker_pids()
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    thread.join(timeout=240)
    assert killed is not None, "the job ended before an actor could be killed"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert_same(read_output(tmp_path / "out"), reference_top_n(big, big_scores, TOP_N))
    assert summary.pairs_in == summary.pairs_scored == len(big)
    # The killed actor's units in flight (if the read stage had handed it any) were scored again, counted once.
    assert 0 <= summary.units_retried <= summary.units
    written = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert written["pairs_in"] == len(big) and written["rejected"] == 0
