"""Many small files make few units: consecutive whole-row-group units of small files combine up to scale.unit_rows
pairs, read in one task; the output, the accounting and resume are as for the same pairs in one file."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io.rows import detect_layout
from pipelines.io.storage import Storage
from pipelines.io.units import Unit, UnitReader, plan_units, read_footers
from pipelines.job import plan_rerank, run_rerank
from pipelines.scoring import Scorer
from tests.datasets import make_pairs, read_output, reference_top_n, small_job

pytestmark = pytest.mark.timeout(300)

TOP_N = 3


def write_small_files(df: pd.DataFrame, folder, rows_per_file: int = 5):
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, len(df), rows_per_file)):
        part = df.iloc[start : start + rows_per_file]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / f"part-{i:04d}.parquet")
    return folder


def test_small_files_are_planned_as_few_units(tmp_path):
    df = make_pairs(num_queries=40, per_query=10, seed=5)
    src = write_small_files(df, tmp_path / "in")
    storage = Storage.for_uri(str(src))
    footers = read_footers(storage, storage.list_parquet(str(src)))
    layout = detect_layout(footers[0].schema, "in", corpus=False)
    units, rows = plan_units(footers, layout, unit_rows=60)
    assert rows == len(df) and len(footers) == -(-len(df) // 5)
    assert len(units) == -(-len(df) // 60)  # 5-row files packed into units of 60 pairs
    assert sum(u.rows for u in units) == len(df)
    covered = sorted(r for u in units for r in u.ranges)
    assert covered == sorted(
        (f.info.path, 0, 5 if i < len(footers) - 1 else len(df) - 5 * i) for i, f in enumerate(footers)
    )
    assert len({u.uid for u in units}) == len(units)
    again = [Unit.from_list(u.to_list()) for u in units]  # the manifest's form
    assert again == units
    reader = UnitReader(storage)
    table = pa.concat_tables([reader.read(u, ["query_id", "doc_id"]) for u in units])
    assert sorted(table.column("doc_id").to_pylist()) == sorted(df["doc_id"])


def test_a_large_file_still_splits_and_never_combines_its_slices(tmp_path):
    df = make_pairs(num_queries=30, per_query=10, seed=6)
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), src / "big.parquet")  # one row group
    write_small_files(df.head(12), src / "small")
    storage = Storage.for_uri(str(src))
    footers = read_footers(storage, storage.list_parquet(str(src)))
    layout = detect_layout(footers[0].schema, "in", corpus=False)
    units, _ = plan_units(footers, layout, unit_rows=50)
    assert all(not u.more for u in units if u.chain)
    assert sum(u.rows for u in units) == len(df) + 12


@pytest.mark.slow
def test_a_job_over_many_small_files_equals_one_over_one_file(ray_local, tmp_path, tiny_cross_encoder):
    df = make_pairs(num_queries=40, per_query=10, seed=7)
    src = write_small_files(df, tmp_path / "in")
    config = small_job(tmp_path, tiny_cross_encoder, src, TOP_N, scale__unit_rows=100)
    plan = plan_rerank(config)
    units, _ = plan_units(plan.footers, plan.layout, config.scale.unit_rows)
    summary = run_rerank(config, plan)
    assert summary.units == len(units) <= -(-len(df) // 100) + 1
    assert summary.pairs_in == summary.pairs_scored == len(df)
    scores = Scorer(config.model).score(df["query"].tolist(), df["text"].tolist())
    ref = reference_top_n(df, scores, TOP_N)
    got = read_output(tmp_path / "out")
    cols = ["query_id", "doc_id", "rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)

    # A resume of an interrupted run reads its combined units from the manifest: the same output.
    resume_out = tmp_path / "resumed"
    resumed = small_job(tmp_path, tiny_cross_encoder, src, TOP_N, scale__unit_rows=100, output__uri=str(resume_out))
    plan = plan_rerank(resumed)
    from pipelines.io.rows import layout_to_json
    from pipelines.job import hold_output

    lease = hold_output(plan)
    plan.progress.write_manifest(
        {
            "version": 2,
            "fingerprint": plan.fingerprint,
            "layout": layout_to_json(plan.layout),
            "join_partitions": 2,
            "units": [u.to_list() for u in units],
        }
    )
    lease.release()
    resume = resumed.model_copy(update={"output": resumed.output.model_copy(update={"mode": "resume"})})
    again = run_rerank(resume)
    assert again.units == len(units) and again.pairs_scored == len(df)
    pd.testing.assert_frame_equal(read_output(resume_out)[cols], ref[cols], check_dtype=False)
