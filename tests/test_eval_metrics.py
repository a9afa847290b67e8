"""Metrics against hand-computed values, token costs, the per-K reranking rule, the trade-off answers,
run files, and the first stages. No Ray here."""

from __future__ import annotations

import itertools
import math

import ir_measures
import numpy as np
import pytest

from pipelines.config import BM25Config, EvalConfig, ModelConfig
from pipelines.evaluation.costs import context_tokens, count_tokens, token_summary
from pipelines.evaluation.first_stage import bm25_retrieve, dense_retrieve, run_file_candidates
from pipelines.evaluation.metrics import evaluate, measure_names, rank_scores
from pipelines.evaluation.report import write_run
from pipelines.evaluation.sweep import FIRST_STAGE, rerank_top_k, run_name, tradeoff

QRELS = {"q1": {"d1": 2, "d2": 1, "d3": 0}, "q2": {"d9": 1}}
RANKING = {"q1": ["d3", "d1", "d4", "d2"], "q2": ["d7", "d8", "d9"]}


def test_measures_hand_computed():
    got = evaluate(RANKING, QRELS, ["q1", "q2"], ["nDCG@10", "RR@10", "R@2", "R@4", "Success@1", "Success@3", "P@2"])
    # q1: gains 0, 2, 0, 1 at ranks 1..4; ideal 2, 1.
    ndcg_q1 = (2 / math.log2(3) + 1 / math.log2(5)) / (2 + 1 / math.log2(3))
    # q2: the only relevant doc at rank 3.
    ndcg_q2 = (1 / math.log2(4)) / 1
    assert got["nDCG@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-12)
    assert got["RR@10"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert got["R@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert got["R@4"] == pytest.approx((1 + 1) / 2)
    assert got["Success@1"] == 0.0
    assert got["Success@3"] == 1.0
    assert got["P@2"] == pytest.approx((1 / 2 + 0) / 2)


def test_missing_or_empty_query_counts_zero():
    got = evaluate({"q1": RANKING["q1"], "q2": []}, QRELS, ["q1", "q2"], ["RR@10", "Success@4"])
    assert got == {"RR@10": pytest.approx(0.25), "Success@4": pytest.approx(0.5)}
    assert evaluate({"q1": RANKING["q1"]}, QRELS, ["q1", "q2"], ["RR@10"])["RR@10"] == pytest.approx(0.25)


def test_measure_names_are_ir_measures_names():
    names = measure_names([20, 5], "R", depth=3)
    assert names == ["nDCG@10", "RR@10", "R@5", "R@20", "Success@5", "Success@20", "R@1", "R@2", "R@3"]
    assert [str(ir_measures.parse_measure(n)) for n in names] == names


def test_rank_scores_strictly_decreasing():
    assert rank_scores(["a", "b", "c"]) == {"a": 3.0, "b": 2.0, "c": 1.0}


def test_run_file_round_trip_gives_the_same_figures(tmp_path):
    # Ties in the source scores must not matter: the file carries the ranking, not the scores.
    ranking = {"q1": ["d4", "d2", "d1", "d3"], "q2": ["d9", "d7"]}
    path = tmp_path / "x.run"
    write_run(path, ranking, ["q1", "q2"], "x")
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 d4 1 4 x" and lines[3] == "q1 Q0 d3 4 1 x" and lines[4] == "q2 Q0 d9 1 2 x"
    names = ["nDCG@10", "RR@10", "R@1", "R@2", "Success@1"]
    ours = evaluate(ranking, QRELS, ["q1", "q2"], names)
    theirs = ir_measures.calc_aggregate(
        [ir_measures.parse_measure(n) for n in names], QRELS, list(ir_measures.read_trec_run(str(path)))
    )
    assert {str(k): v for k, v in theirs.items()} == pytest.approx(ours)


def test_context_tokens_and_cost():
    doc_tokens = {"a": 10, "b": 20, "c": 5}
    tok = context_tokens({"q1": ["b", "a", "c"], "q2": ["c"]}, doc_tokens, ["q1", "q2", "q3"], depth=3)
    assert tok.tolist() == [[20, 30, 35], [5, 5, 5], [0, 0, 0]]
    s = token_summary(tok, 2, price_per_million=2.0)
    assert s == {
        "total_tokens": 35,
        "mean_tokens_per_query": pytest.approx(35 / 3),
        "cost_total": pytest.approx(35 * 2.0 / 1e6),
        "cost_per_1000_queries": pytest.approx(35 / 3 * 1000 * 2.0 / 1e6),
    }


def test_count_tokens_with_a_real_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from tests.tiny_models import build_cross_encoder

    path = build_cross_encoder(tmp_path / "ce")
    texts = {"a": "shock wave", "b": "", "c": "the boundary layer " * 200}
    counts = count_tokens(texts, str(path))
    tok = AutoTokenizer.from_pretrained(path)
    assert counts["a"] == 2 and counts["b"] == 0
    # No truncation and no special tokens, even past the model's 128-token limit.
    assert counts["c"] == 600 == len(tok("the boundary layer " * 200, add_special_tokens=False)["input_ids"])


def test_rerank_top_k_reorders_only_the_head():
    first = {"q": ["a", "b", "c", "d", "e"]}
    scores = {"q": {"a": 0.1, "b": 0.9, "c": 0.9, "d": 5.0, "e": 9.0}}
    assert rerank_top_k(first, scores, 3) == {"q": ["b", "c", "a", "d", "e"]}  # b/c tie: first-stage order
    assert rerank_top_k(first, scores, 5) == {"q": ["e", "d", "b", "c", "a"]}
    # An unscored candidate (rejected by the job) sorts after the scored ones within the head.
    assert rerank_top_k(first, {"q": {"b": 1.0, "c": 2.0}}, 3) == {"q": ["c", "b", "a", "d", "e"]}


def _config(**kw) -> EvalConfig:
    return EvalConfig(model={"name_or_path": "x"}, **kw)


def test_tradeoff_answers():
    cfg = _config(k_values=[2], n_grid=[1, 2, 3, 4], n_base=[3], first_stage={"depth": 4})
    measures = {
        FIRST_STAGE: {"R@1": 0.1, "R@2": 0.5, "R@3": 0.5, "R@4": 0.8},
        run_name(2): {"R@1": 0.3, "R@2": 0.6, "R@3": 0.7, "R@4": 0.8},
    }
    tokens = {
        FIRST_STAGE: np.array([[10, 20, 30, 40], [10, 30, 50, 70]]),
        run_name(2): np.array([[5, 15, 30, 40], [20, 30, 50, 70]]),
    }
    (row,) = tradeoff(measures, tokens, {2: 4}, cfg, pairs_per_s=2.0)
    assert row["first_stage_quality_at_n_base"] == 0.5
    assert row["reranked_quality_at_n_base"] == 0.7
    assert row["gain_at_n_base"] == pytest.approx(0.2)
    assert row["n_reranked"] == 2  # 0.6 >= 0.5 at N=2
    assert row["first_stage_n_min"] == 2  # the first stage itself has 0.5 at N=2
    assert row["llm_first_stage_at_n_base"]["total_tokens"] == 80
    assert row["llm_reranked_at_n_reranked"]["total_tokens"] == 45
    assert row["llm_tokens_saved"] == 35 and row["llm_tokens_saved_fraction"] == pytest.approx(35 / 80)
    assert row["reranker_pairs_scored"] == 4 and row["reranker_seconds_estimated"] == 2.0

    measures[run_name(2)] = {"R@1": 0.0, "R@2": 0.1, "R@3": 0.2, "R@4": 0.45}
    (row,) = tradeoff(measures, tokens, {2: 4}, cfg, pairs_per_s=2.0)
    assert row["n_reranked"] is None and row["llm_reranked_at_n_reranked"] is None
    cfg.tolerance = 0.05
    (row,) = tradeoff(measures, tokens, {2: 4}, cfg, pairs_per_s=2.0)
    assert row["n_reranked"] == 4


CORPUS = {
    "1": "shock waves at high mach number",
    "2": "heat transfer in the boundary layer",
    "3": "boundary layer flow over a flat plate",
    "4": "wing lift in supersonic flow",
}


def test_bm25_first_stage():
    run = bm25_retrieve(CORPUS, {"a": "boundary layer heat", "b": "zzz unknown"}, k=3, config=BM25Config())
    assert [d for d, _ in run["a"]] == ["2", "3", "4"]
    scores = [s for _, s in run["a"]]
    assert scores[0] > scores[1] > 0.0 == scores[2]
    assert run["b"] == []


def test_dense_first_stage_ranks_by_cosine(tmp_path):
    from pipelines.model.scoring import Scorer
    from tests.tiny_models import build_bi_encoder

    model = ModelConfig(name_or_path=str(build_bi_encoder(tmp_path / "bi")), kind="bi-encoder", max_length=64)
    run = dense_retrieve(CORPUS, {"a": "boundary layer"}, k=4, model=model)
    docs = [d for d, _ in run["a"]]
    expected = Scorer(model).score(["boundary layer"] * 4, [CORPUS[d] for d in docs])
    assert sorted(docs) == ["1", "2", "3", "4"]
    assert [s for _, s in run["a"]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(a >= b for a, b in itertools.pairwise(expected))


def test_run_file_first_stage_drops_unknown_docs(tmp_path):
    p = tmp_path / "r.run"
    p.write_text("a Q0 2 1 3.0 s\na Q0 99 2 2.0 s\na Q0 1 3 1.0 s\nb Q0 1 1 1.0 s\n")
    run, dropped = run_file_candidates(str(p), CORPUS, ["a", "c"], k=5)
    assert run == {"a": [("2", 3.0), ("1", 1.0)], "c": []} and dropped == 1
