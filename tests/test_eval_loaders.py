"""Every loader of `rerank eval` on small files with known content, the bundled Cranfield, and the config."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import EvalConfig, load_config
from pipelines.errors import ConfigError, InputError
from pipelines.evaluation.sweep import load_collection
from pipelines.io import collections as loaders

DATA = Path(__file__).parent / "data" / "eval"


def test_trec_qrels_negative_labels_are_judged_not_relevant():
    assert loaders.read_trec_qrels(DATA / "qrels.trec") == {
        "q1": {"d1": 2, "d2": 1, "d3": 0},
        "q2": {"d9": 1, "d8": 0},
    }


def test_trec_qrels_relevance_map():
    qrels = loaders.read_trec_qrels(DATA / "qrels.trec", grades={2: 10, 1: 5, 0: 0, -1: 0})
    assert qrels["q1"] == {"d1": 10, "d2": 5, "d3": 0}
    with pytest.raises(InputError, match="relevance_map"):
        loaders.read_trec_qrels(DATA / "qrels.trec", grades={2: 1})


def test_trec_run_ignores_rank_column_and_breaks_ties_like_trec_eval():
    run = loaders.read_trec_run(DATA / "run.trec")
    # d4 has the best score despite rank 3; d3/d1 tie at 2.5 -> doc id descending (d3 before d1).
    assert run == {"q1": [("d4", 7.0), ("d3", 2.5), ("d1", 2.5), ("d2", 1.0)], "q2": [("d9", 0.1)]}


def test_trec_run_rejects_short_lines(tmp_path):
    bad = tmp_path / "bad.run"
    bad.write_text("q1 Q0 d1 1 2.0\n")
    with pytest.raises(InputError, match="6 columns"):
        loaders.read_trec_run(bad)


def test_beir_folder():
    coll = loaders.load_beir(DATA / "beir")
    assert coll.corpus == {
        "d1": "Shock waves\nA study of shock waves at mach 2.",
        "d2": "Boundary layer heat transfer.",
        "3": "Wings\nLift of a wing in supersonic flow.",
    }
    assert coll.queries["q3"] == "a query of another split"
    assert coll.qrels == {"q1": {"d1": 2, "3": 0}, "q2": {"d2": 1}}
    # q3 has no judgment: not evaluated.
    assert coll.judged_queries() == ["q1", "q2"]
    assert loaders.load_beir(DATA / "beir", title="ignore").corpus["d1"] == "A study of shock waves at mach 2."


def test_beir_missing_file(tmp_path):
    with pytest.raises(InputError, match="qrels/dev.tsv is missing"):
        loaders.load_beir(DATA / "beir", split="dev")


def test_read_qrels_tells_trec_from_beir():
    assert loaders.read_qrels(DATA / "beir" / "qrels" / "test.tsv") == {"q1": {"d1": 2, "3": 0}, "q2": {"d2": 1}}
    assert loaders.read_qrels(DATA / "qrels.trec")["q2"] == {"d9": 1, "d8": 0}


def test_parquet_corpus_and_queries_with_integer_ids(tmp_path):
    pq.write_table(
        pa.table({"doc_id": [7, 8], "title": ["T", None], "text": ["seven", "eight"]}), tmp_path / "corpus.parquet"
    )
    pq.write_table(pa.table({"query_id": [1], "query": ["what"]}), tmp_path / "queries.parquet")
    assert loaders.read_corpus(tmp_path / "corpus.parquet") == {"7": "T\nseven", "8": "eight"}
    assert loaders.read_queries(tmp_path / "queries.parquet") == {"1": "what"}


def test_jsonl_and_tsv_queries(tmp_path):
    assert loaders.read_queries(DATA / "queries.tsv") == {"q1": "shock wave at mach 2", "q2": "heat transfer"}
    p = tmp_path / "q.jsonl"
    p.write_text('{"query_id": "a", "query": "x y"}\n\n{"qid": 2, "text": "z"}\n')
    assert loaders.read_queries(p) == {"a": "x y", "2": "z"}
    p.write_text('{"name": "a"}\n')
    with pytest.raises(InputError, match="no query id"):
        loaders.read_queries(p)


def test_smart_documents_crlf_and_empty_text():
    docs = loaders.read_smart_documents(DATA / "smart" / "docs.all")
    assert docs == {"1": "shock waves at mach 2 .", "2": "heat transfer in the boundary layer .", "3": ""}
    assert loaders.read_smart_documents(DATA / "smart" / "docs.all", ("T", "W"))["2"] == (
        "heat heat transfer in the boundary layer ."
    )


def test_smart_queries_by_position_or_number():
    by_pos = loaders.read_smart_queries(DATA / "smart" / "queries.qry")
    assert by_pos == {"1": "what about shock waves .", "2": "heat transfer ."}
    assert list(loaders.read_smart_queries(DATA / "smart" / "queries.qry", ids="number")) == ["1", "4"]


def test_smart_qrels_cranfield_codes_and_cisi_pairs():
    assert loaders.read_smart_qrels(DATA / "smart" / "cran.rel", loaders.CRANFIELD_GRADES) == {
        "1": {"1": 3, "2": 0},
        "2": {"2": 4, "3": 1},
    }
    assert loaders.read_smart_qrels(DATA / "smart" / "cisi.rel") == {"1": {"1": 1}, "2": {"2": 1}}


def test_cranfield_bundled():
    coll = loaders.load_cranfield()
    assert len(coll.corpus) == 1400 and len(coll.queries) == 225
    assert sum(g > 0 for j in coll.qrels.values() for g in j.values()) == 1612
    assert len(coll.judged_queries()) == 225
    # Ids are positions in cran.qry: query 3 is .I 004 in the file.
    assert coll.queries["3"] == "what problems of heat conduction in composite slabs have been solved so far ."
    assert coll.qrels["1"]["184"] == 3 and coll.qrels["1"]["12"] == 2  # codes 2 and 3
    assert coll.corpus["1"].startswith("experimental investigation of the aerodynamics of a wing in a slipstream .")
    assert coll.corpus["471"] == ""  # empty in the original


def test_load_collection_from_config(tmp_path):
    cfg = EvalConfig(
        model={"name_or_path": "x"},
        data={
            "format": "smart",
            "corpus": str(DATA / "smart" / "docs.all"),
            "queries": str(DATA / "smart" / "queries.qry"),
            "qrels": str(DATA / "smart" / "cran.rel"),
            "relevance_map": {1: 4, 2: 3, 3: 2, 4: 1, -1: 0},
        },
    )
    coll = load_collection(cfg.data)
    assert coll.qrels["2"] == {"2": 4, "3": 1}
    cfg = EvalConfig(
        model={"name_or_path": "x"},
        data={
            "format": "files",
            "corpus": str(DATA / "beir" / "corpus.jsonl"),
            "queries": str(DATA / "queries.tsv"),
            "qrels": str(DATA / "beir" / "qrels" / "test.tsv"),
        },
    )
    coll = load_collection(cfg.data)
    assert coll.judged_queries() == ["q1", "q2"] and coll.queries["q2"] == "heat transfer"


def test_eval_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="data.format beir needs data.path"):
        load_config(EvalConfig, None, ["model.name_or_path=x", "data.format=beir"])
    with pytest.raises(ConfigError, match="first_stage.model"):
        load_config(EvalConfig, None, ["model.name_or_path=x", "first_stage.kind=dense"])
    with pytest.raises(ConfigError, match="below the largest K"):
        load_config(EvalConfig, None, ["model.name_or_path=x", "first_stage.depth=50"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(EvalConfig, None, ["model.name_or_path=x", "k_value=[1]"])
    cfg = load_config(EvalConfig, Path(__file__).parent.parent / "conf" / "eval_cranfield.yaml", ["k_values=[20, 5]"])
    assert cfg.k_values == [5, 20] and cfg.depth == 100 and cfg.model.kind == "bi-encoder"
