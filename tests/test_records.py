"""Top-N and row validation on plain Arrow tables."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.errors import InputError
from pipelines.io import rows as records


def scored(qids, docs, scores, fsr=None):
    cols = {"query_id": qids, "doc_id": docs, "score": pa.array(scores, pa.float32())}
    if fsr is not None:
        cols["first_stage_rank"] = pa.array(fsr, pa.int64())
    return pa.table(cols)


def test_fewer_candidates_than_n_keeps_all():
    out = records.top_n_per_query(scored([1, 1], ["a", "b"], [0.1, 0.9]), 10)
    assert out.column("doc_id").to_pylist() == ["b", "a"] and out.column("rank").to_pylist() == [1, 2]


def test_ties_break_by_first_stage_rank_then_doc_id():
    t = scored([7] * 4, ["d", "c", "b", "a"], [1.0, 1.0, 1.0, 2.0], fsr=[2, 1, None, 9])
    out = records.top_n_per_query(t, 3)
    assert out.column("doc_id").to_pylist() == ["a", "c", "d"]
    no_fsr = records.top_n_per_query(scored([7] * 3, ["z", "x", "y"], [1.0] * 3), 2)
    assert no_fsr.column("doc_id").to_pylist() == ["x", "y"]


def test_many_queries_rank_independently():
    t = scored(["q2", "q1", "q2", "q1", "q2"], [1, 2, 3, 4, 5], [0.5, 0.1, 0.7, 0.2, 0.6])
    out = records.top_n_per_query(t, 2).to_pydict()
    assert out["query_id"] == ["q1", "q1", "q2", "q2"]
    assert out["doc_id"] == [4, 2, 3, 5] and out["rank"] == [1, 2, 1, 2]


def test_empty_input():
    t = scored(pa.array([], pa.int64()), pa.array([], pa.string()), [])
    out = records.top_n_per_query(t, 3)
    assert out.num_rows == 0 and "rank" in out.column_names


def test_packed_explode_and_rejects():
    t = pa.table(
        {
            "query_id": ["a", "b", "c"],
            "query": ["heat", "flow", "mach"],
            "candidates": [[{"doc_id": 1, "text": "x"}, {"doc_id": 2, "text": None}], [], None],
        }
    )
    layout = records.detect_layout(t.schema, "t", corpus=False)
    pairs, empty = records.explode_packed(t, layout)
    assert pairs.to_pydict() == {
        "query_id": ["a", "a"],
        "query": ["heat", "heat"],
        "doc_id": [1, 2],
        "text": ["x", None],
    }
    assert empty.column("reason").to_pylist() == ["no_candidates", "no_candidates"]
    valid, bad = records.split_rejects(pairs, layout)
    assert valid.num_rows == 1 and bad.to_pylist() == [
        {"query_id": "a", "doc_id": 2, "reason": "empty_text", "detail": None}
    ]


def test_non_finite_scores_are_rejected():
    layout = records.detect_layout(
        pa.schema([("query_id", pa.int64()), ("query", pa.string()), ("doc_id", pa.int64()), ("text", pa.string())]),
        "t",
        False,
    )
    t = scored([1, 1, 1], [1, 2, 3], [0.5, float("nan"), float("inf")])
    valid, bad = records.split_non_finite(t, layout)
    assert valid.column("doc_id").to_pylist() == [1]
    assert bad.column("reason").to_pylist() == ["score_not_finite"] * 2


@pytest.mark.parametrize(
    "schema, corpus, message",
    [
        (
            [("query_id", pa.int64()), ("query", pa.string()), ("doc_id", pa.int64()), ("text", pa.string())],
            True,
            "remove one of the two",
        ),
        (
            [("query_id", pa.int64()), ("query", pa.string()), ("doc_id", pa.float64()), ("text", pa.string())],
            False,
            "doc_id must be",
        ),
        (
            [("query_id", pa.int64()), ("query", pa.int64()), ("doc_id", pa.int64()), ("text", pa.string())],
            False,
            "query must be a string",
        ),
        (
            [
                ("query_id", pa.int64()),
                ("query", pa.string()),
                ("doc_id", pa.int64()),
                ("text", pa.string()),
                ("first_stage_rank", pa.string()),
            ],
            False,
            "first_stage_rank must be an integer",
        ),
    ],
)
def test_layout_errors(schema, corpus, message):
    with pytest.raises(InputError, match=message):
        records.detect_layout(pa.schema(schema), "f.parquet", corpus)


def test_corpus_id_type_must_match():
    with pytest.raises(InputError, match="must match"):
        records.check_corpus(pa.schema([("doc_id", pa.string()), ("text", pa.string())]), "c", pa.int64())
