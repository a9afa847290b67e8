"""Reads in proportion to the data: units along row groups, a large row group decoded once across its slices,
packed units sized from metadata, one footer read per file, and the scheduler's chains."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ModelConfig
from pipelines.io.rows import detect_layout
from pipelines.io.storage import Storage
from pipelines.io.units import Unit, UnitReader, plan_units, read_footers
from pipelines.job import plan_rerank, run_rerank
from pipelines.job.stages import chains_of
from pipelines.model.scoring import Scorer
from tests.datasets import WORDS, read_output, reference_top_n, small_job

pytestmark = pytest.mark.timeout(400)

TOP_N = 3


def short_pairs(num_queries: int, per_query: int, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for q in range(num_queries):
        query = " ".join(rng.choices(WORDS, k=3))
        rows += [
            {
                "query_id": q,
                "query": query,
                "doc_id": 100 * q + d,
                "text": " ".join(rng.choices(WORDS, k=4)),
                "first_stage_rank": d + 1,
            }
            for d in range(per_query)
        ]
    return pd.DataFrame(rows)


def scores_of(df: pd.DataFrame, model: str) -> np.ndarray:
    return Scorer(ModelConfig(name_or_path=model, max_length=32)).score(df["query"].tolist(), df["text"].tolist())


def assert_equal(out, ref: pd.DataFrame) -> None:
    got = read_output(out)
    cols = ["query_id", "doc_id", "rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-4)


def test_one_large_row_group_is_decoded_once_across_its_slices(ray_local, tmp_path, tiny_cross_encoder):
    """60,000 rows in one row group cut into 12 units of 5,000: every row decoded once (it used to be decoded
    about 6.5 times over), and the output equals the one-unit run's."""
    pairs = short_pairs(3000, 20).sample(frac=1.0, random_state=1).reset_index(drop=True)
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.Table.from_pandas(pairs, preserve_index=False), tmp_path / "in" / "big.parquet", row_group_size=len(pairs)
    )
    assert pq.ParquetFile(tmp_path / "in" / "big.parquet").metadata.num_row_groups == 1
    common = {
        "model__max_length": 32,
        "model__batch_size": 256,
        "scale__batch_rows": 4096,
        "scale__num_actors": 1,
        "scale__num_cpus_per_actor": 1,
    }
    sliced = run_rerank(
        small_job(tmp_path, tiny_cross_encoder, tmp_path / "in", TOP_N, scale__unit_rows=5000, **common)
    )
    assert sliced.units == 12 and sliced.read_amplification == 1.0
    whole = small_job(
        tmp_path,
        tiny_cross_encoder,
        tmp_path / "in",
        TOP_N,
        scale__unit_rows=60_000,
        output__uri=str(tmp_path / "whole"),
        **common,
    )
    assert run_rerank(whole).units == 1
    assert_equal(tmp_path / "out", read_output(tmp_path / "whole"))


def test_row_groups_larger_and_smaller_than_a_unit(ray_local, tmp_path, tiny_cross_encoder, monkeypatch):
    """Also the reduce with several merge groups and buckets (the rows of a query spread over units)."""
    import pipelines.job.reduce

    monkeypatch.setattr(pipelines.job.reduce, "MERGE_FANIN", 3)
    pairs = short_pairs(60, 9, seed=2).sample(frac=1.0, random_state=3).reset_index(drop=True)
    ref = reference_top_n(pairs, scores_of(pairs, tiny_cross_encoder), TOP_N)
    src = tmp_path / "in"
    src.mkdir()
    table = pa.Table.from_pandas(pairs, preserve_index=False)
    with pq.ParquetWriter(src / "mixed.parquet", table.schema) as w:  # row groups of 7, 100, 3, 250 ... rows
        start = 0
        for size in [7, 100, 3, 250, 1, 40, 139]:
            w.write_table(table.slice(start, size), row_group_size=size)
            start += size
    pq.write_table(table.slice(start), src / "small-groups.parquet", row_group_size=5)
    assert pq.ParquetFile(src / "mixed.parquet").metadata.num_row_groups == 7
    summary = run_rerank(
        small_job(
            tmp_path, tiny_cross_encoder, src, TOP_N, scale__unit_rows=60, model__max_length=32, scale__num_partitions=3
        )
    )
    assert summary.pairs_scored == len(pairs) and summary.read_amplification <= 1.5
    assert summary.scale["reduce_buckets"] == 3 and len(list((tmp_path / "out").glob("part-*.parquet"))) == 3
    assert_equal(tmp_path / "out", ref)


def test_packed_units_are_sized_from_metadata(ray_local, tmp_path, tiny_cross_encoder):
    """20 row groups whose first holds short candidate lists and the rest long ones: units come out near
    unit_rows pairs (sizing from row group 0 alone made one unit of thousands), and no text is read to plan."""
    pairs = short_pairs(200, 30, seed=4)
    rng = random.Random(5)
    queries = []
    for qid, group in pairs.groupby("query_id", sort=True):
        n = 2 if qid < 10 else rng.randint(15, 30)  # row group 0 (queries 0-9): 2 candidates each
        cands = group.head(n).drop(columns=["query_id", "query"]).to_dict("records")
        queries.append({"query_id": int(qid), "query": group["query"].iloc[0], "candidates": cands})
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(queries), src / "packed.parquet", row_group_size=10)
    assert pq.ParquetFile(src / "packed.parquet").metadata.num_row_groups == 20
    storage = Storage.for_uri(str(src))
    footers = read_footers(storage, storage.list_parquet(str(src)))
    layout = detect_layout(footers[0].schema, "packed", corpus=False)
    units, rows = plan_units(footers, layout, unit_rows=100)
    assert rows == 200
    sizes = [sum(len(q["candidates"]) for q in queries[u.start : u.end]) for u in units]
    assert max(sizes) <= 150, sizes  # a unit is whole row groups of <= 100 pairs, or a slice of one near it
    flat = pd.DataFrame(
        [{"query_id": q["query_id"], "query": q["query"], **c} for q in queries for c in q["candidates"]]
    )
    ref = reference_top_n(flat, scores_of(flat, tiny_cross_encoder), TOP_N)
    summary = run_rerank(
        small_job(tmp_path, tiny_cross_encoder, src, TOP_N, scale__unit_rows=100, model__max_length=32)
    )
    assert summary.pairs_scored == len(flat) and summary.units == len(units)
    assert_equal(tmp_path / "out", ref)
    manifest_free = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert manifest_free["read_amplification"] <= 1.5


def test_the_plan_reads_each_footer_once(tmp_path, tiny_cross_encoder, monkeypatch):
    pairs = short_pairs(20, 5)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        pq.write_table(
            pa.Table.from_pandas(pairs.iloc[i::4], preserve_index=False), src / f"p{i}.parquet", row_group_size=7
        )
    from pipelines.io import units as reads

    calls = []
    real = reads._read_range
    monkeypatch.setattr(reads, "_read_range", lambda st, path, a, b: calls.append(path) or real(st, path, a, b))
    opened = []
    real_open = Storage.for_uri(str(src)).fs.__class__.open
    monkeypatch.setattr(
        type(Storage.for_uri(str(src)).fs),
        "open",
        lambda self, path, *a, **k: opened.append(path) or real_open(self, path, *a, **k),
    )
    plan = plan_rerank(small_job(tmp_path, tiny_cross_encoder, src, TOP_N))
    assert sorted(calls) == sorted(str(src / f"p{i}.parquet") for i in range(4))  # one tail read each
    assert not [p for p in opened if p.endswith(".parquet")]  # nothing else opened an input file
    units, _ = plan_units(plan.footers, plan.layout, unit_rows=10)
    assert all(u.end - u.start <= 14 for u in units)  # whole row groups of 7 rows: two per unit


def test_a_reader_keeps_its_place_in_a_chain(tmp_path):
    table = pa.table({"x": list(range(1000)), "text": [str(i) for i in range(1000)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=1000)
    reader = UnitReader(Storage.for_uri(str(tmp_path)))
    path = str(tmp_path / "a.parquet")
    slices = [Unit.of(path, s, min(1000, s + 300), chain=f"{path}#0") for s in range(0, 1000, 300)]
    got = [reader.read(u, ["x"]).column("x").to_pylist() for u in slices]
    assert [x for part in got for x in part] == list(range(1000)) and reader.rows_decoded == 1000
    again = UnitReader(Storage.for_uri(str(tmp_path)))
    assert again.read(slices[2], ["x"]).column("x").to_pylist() == list(range(600, 900))
    assert again.rows_decoded >= 900  # out of order: the rows before it are decoded too


def test_chains_keep_a_row_groups_slices_together_in_order():
    units = [Unit.of("f", 100 * i, 100 * (i + 1), chain="f#0") for i in range(4)] + [Unit.of("g", 0, 10)]
    chains = chains_of(units)
    assert [[u.start for u in c] for c in chains] == [[0, 100, 200, 300], [0]]
    assert chains[1][0].path == "g"
