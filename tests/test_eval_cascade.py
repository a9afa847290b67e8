"""`rerank eval` with two single models and their cascade (and a cascade whose stages carry their own models): the
report's every figure recomputed from the files it names (runs/, qrels.txt, the jobs' scores and _summary.json),
the cascade's run equal to a two-step rerank of the single models' scores by hand, pairs per stage counted."""

from __future__ import annotations

import json

import ir_measures
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import main
from pipelines.config import EvalConfig, validate_config
from pipelines.errors import ConfigError
from pipelines.evaluation.cascade import cascade_ranking
from pipelines.io.collections import read_trec_qrels, read_trec_run

pytestmark = pytest.mark.timeout(400)

K_VALUES, N_GRID, N_BASE, DEPTH, QUERIES, KEEP = [3, 10], [1, 3, 5, 10], [3, 5], 10, 6, 4
OWN_KEEP = 3  # the cascade whose stages carry their own models


@pytest.fixture(scope="module")
def report(ray_local, tmp_path_factory):
    from tests.tiny_models import build_cross_encoder

    models = tmp_path_factory.mktemp("models")
    small = {"name_or_path": str(build_cross_encoder(models / "small", seed=0)), "max_length": 128}
    big = {"name_or_path": str(build_cross_encoder(models / "big", seed=1)), "max_length": 128}
    third = {"name_or_path": str(build_cross_encoder(models / "third", seed=2)), "max_length": 128}
    out = tmp_path_factory.mktemp("eval") / "report"
    conf = out.parent / "eval.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "data": {"format": "cranfield", "max_queries": QUERIES},
                "first_stage": {"kind": "bm25", "depth": DEPTH},
                "rerankers": [
                    {"name": "small", "model": small},
                    {"name": "big", "model": big},
                    {"name": "small_then_big", "cascade": [{"reranker": "small", "keep": KEEP}, {"reranker": "big"}]},
                    # Stage a has small's model section (its scores are reused: no job); stage b a model of its own,
                    # scored by its own job over only what reaches it.
                    {
                        "name": "own",
                        "cascade": [{"name": "a", "model": small, "keep": OWN_KEEP}, {"name": "b", "model": third}],
                    },
                ],
                "k_values": K_VALUES,
                "n_grid": N_GRID,
                "n_base": N_BASE,
                "cost": {"tokenizer": small["name_or_path"], "reranker_price_per_hour": 3.6},
                "report": {"dir": str(out)},
                "scale": {"num_actors": 1, "num_cpus_per_actor": 0.5},
            }
        )
    )
    assert main(["eval", str(conf)]) == 0
    return out, json.loads((out / "report.json").read_text())


def _job_scores(folder) -> dict[str, dict[str, float]]:
    scores: dict[str, dict[str, float]] = {}
    for row in pq.read_table(folder, columns=["query_id", "doc_id", "score"]).to_pylist():
        scores.setdefault(row["query_id"], {})[row["doc_id"]] = row["score"]
    return scores


def _order(docs: list[str], s: dict[str, float]) -> list[str]:
    return sorted((d for d in docs if d in s), key=lambda d: -s[d]) + [d for d in docs if d not in s]


def _ids(run, q) -> list[str]:
    return [d for d, _ in run.get(q, [])]


def test_runs_files_and_tables(report):
    out, rep = report
    names = {f"{r}_k{k}" for r in ("small", "big", "small_then_big", "own") for k in K_VALUES} | {"first_stage"}
    assert set(rep["runs"]) == names
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{n}.run" for n in names)
    assert rep["rerankers"]["small_then_big"]["kind"] == "cascade"
    assert rep["rerankers"]["small_then_big"]["name_or_path"] == "small (keep 4) -> big"
    assert [s["reranker"] for s in rep["rerankers"]["own"]["stages"]] == ["small", None]
    # Stage a reused small's job; stage b had its own; no job for the cascade of entries.
    jobs = sorted(p.name for p in out.iterdir() if p.name.startswith("rerank_job"))
    assert jobs == ["rerank_job_big", "rerank_job_own.b", "rerank_job_small"]
    assert rep["rerankers"]["own"]["stages"][0]["job_output"] == "rerank_job_small"
    md = (out / "report.md").read_text()
    assert "## Cascades: pairs scored per stage" in md
    assert all(f"| {r} | {k} |" in md for r in ("small", "big", "small_then_big", "own") for k in K_VALUES)
    assert len(rep["tradeoff"]) == 4 * len(K_VALUES) * len(N_BASE)
    assert (out / "quality_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cascade_run_is_the_two_step_rerank_of_the_single_models(report):
    out, _ = report
    first = read_trec_run(out / "runs" / "first_stage.run")
    small, big = _job_scores(out / "rerank_job_small"), _job_scores(out / "rerank_job_big")
    third = _job_scores(out / "rerank_job_own.b")
    for k in K_VALUES:
        run = read_trec_run(out / "runs" / f"small_then_big_k{k}.run")
        single = read_trec_run(out / "runs" / f"small_k{k}.run")
        own = read_trec_run(out / "runs" / f"own_k{k}.run")
        for q in first:
            ids = _ids(first, q)
            stage1 = _order(ids[:k], small.get(q, {}))
            assert stage1 == _ids(single, q)[:k]  # stage 1 is the single small model's run at this K
            top = stage1[:KEEP]  # keep >= K passes everything
            assert _ids(run, q) == _order(top, big.get(q, {})) + stage1[KEEP:] + ids[k:], (k, q)
            # stage 2 reorders exactly stage 1's top keep
            assert set(_ids(run, q)[: min(KEEP, k)]) == set(stage1[:KEEP])
            own_top = stage1[:OWN_KEEP]
            assert _ids(own, q) == _order(own_top, third.get(q, {})) + stage1[OWN_KEEP:] + ids[k:], (k, q)
    # The own-model stage's job scored only what reached it for some K: the union of stage a's top OWN_KEEP.
    wanted = {(q, d) for q in first for k in K_VALUES for d in _order(_ids(first, q)[:k], small[q])[:OWN_KEEP]}
    assert {(q, d) for q, ds in third.items() for d in ds} == wanted
    assert json.loads((out / "rerank_job_own.b" / "_summary.json").read_text())["pairs_scored"] == len(wanted)


def test_pairs_per_stage_and_compute_recomputed(report):
    out, rep = report
    first = read_trec_run(out / "runs" / "first_stage.run")
    pps = {
        job: json.loads((out / job / "_summary.json").read_text())["pairs_per_s"]
        for job in ("rerank_job_small", "rerank_job_big", "rerank_job_own.b")
    }
    cascades = {
        "small_then_big": [("rerank_job_small", None, KEEP), ("rerank_job_big", KEEP, None)],
        "own": [("rerank_job_small", None, OWN_KEEP), ("rerank_job_own.b", OWN_KEEP, None)],
    }
    for name, stages in cascades.items():
        fig = rep["rerankers"][name]
        assert [s["pairs_per_s"] for s in fig["stages"]] == pytest.approx([pps[j] for j, _, _ in stages])
        for k in K_VALUES:
            scored = [_job_scores(out / j) for j, _, _ in stages]
            # Stage 1 scores the first-stage top K, stage 2 the top keep of those (all of them when keep >= K).
            n1 = sum(1 for q in first for d in _ids(first, q)[:k] if d in scored[0].get(q, {}))
            n2 = sum(min(stages[1][1], min(k, len(_ids(first, q)))) for q in first)
            at_k = fig["at_k"][str(k)]
            assert [s["pairs_scored"] for s in at_k["stages"]] == [n1, n2]
            assert at_k["pairs_scored"] == n1 + n2
            compute = n1 / pps[stages[0][0]] + n2 / pps[stages[1][0]]
            assert at_k["compute_s"] == pytest.approx(compute)
            assert at_k["seconds_per_1000_queries"] == pytest.approx(1000 * compute / QUERIES)
            assert at_k["cost_per_1000_queries"] == pytest.approx(1000 * compute / QUERIES / 3600 * 3.6)
            run = rep["runs"][f"{name}_k{k}"]
            assert run["reranker_pairs_scored"] == n1 + n2
            assert run["reranker_seconds_estimated"] == pytest.approx(compute)
            assert [s["pairs_scored"] for s in run["stages"]] == [n1, n2]
            for row in (t for t in rep["tradeoff"] if t["reranker"] == name and t["k"] == k):
                assert row["reranker_pairs_scored"] == n1 + n2
                assert row["reranker_seconds_estimated"] == pytest.approx(compute)
    for name, job in (("small", "rerank_job_small"), ("big", "rerank_job_big")):
        for k in K_VALUES:
            n = sum(min(k, len(_ids(first, q))) for q in first)
            assert rep["rerankers"][name]["at_k"][str(k)]["compute_s"] == pytest.approx(n / pps[job])
            assert rep["runs"][f"{name}_k{k}"]["reranker_seconds_estimated"] == pytest.approx(n / pps[job])


def test_quality_and_tokens_recomputed_from_the_run_files(report):
    from transformers import AutoTokenizer

    out, rep = report
    qrels = read_trec_qrels(out / "qrels.txt")
    tok = AutoTokenizer.from_pretrained(rep["settings"]["tokenizer"])
    from pipelines.io.collections import load_cranfield

    corpus = load_cranfield().corpus
    for name, run in rep["runs"].items():
        measures = run["measures"]
        parsed = [ir_measures.parse_measure(m) for m in measures]
        again = ir_measures.calc_aggregate(
            parsed, qrels, list(ir_measures.read_trec_run(str(out / "runs" / f"{name}.run")))
        )
        assert {str(m): v for m, v in again.items()} == pytest.approx(measures, abs=1e-12), name
        ranking = read_trec_run(out / "runs" / f"{name}.run")
        for n, ctx in run["llm_context"].items():
            total = sum(
                len(tok(corpus[d], add_special_tokens=False)["input_ids"])
                for q in ranking
                for d in _ids(ranking, q)[: int(n)]
            )
            assert ctx["total_tokens"] == total, (name, n)
    for row in rep["tradeoff"]:
        m = rep["runs"][f"{row['reranker']}_k{row['k']}"]["measures"]
        base = rep["runs"]["first_stage"]["measures"][f"R@{row['n_base']}"]
        reached = [n for n in range(1, DEPTH + 1) if m[f"R@{n}"] >= base - 1e-9]
        assert row["n_reranked"] == (reached[0] if reached else None)
        if row["n_reranked"]:
            ctx = rep["runs"][f"{row['reranker']}_k{row['k']}"]["llm_context"][str(row["n_reranked"])]
            assert row["llm_reranked_at_n_reranked"]["total_tokens"] == ctx["total_tokens"]


# ---------------------------------------------------------------------------------------------- no Ray


def test_cascade_ranking_rules():
    first = {"q": ["a", "b", "c", "d", "e", "f"]}
    s1 = {"q": {"a": 1.0, "b": 5.0, "c": 4.0, "d": 3.0, "e": 9.0, "f": 8.0}}
    s2 = {"q": {"a": 9.0, "b": 1.0, "c": 2.0, "d": 7.0, "e": 9.0, "f": 0.0}}
    s3 = {"q": {"b": 3.0, "c": 4.0, "d": 0.0}}
    # K=4: stage 1 orders a b c d -> b c d a, keeps b c; stage 2 -> c b; then stage 1's leftovers d a; then e f.
    run = cascade_ranking(first, [s1, s2], [2, None], 4)
    assert run.ranking == {"q": ["c", "b", "d", "a", "e", "f"]} and run.pairs_per_stage == [4, 2]
    # keep >= K passes everything: the second model orders all K.
    run = cascade_ranking(first, [s1, s2], [10, None], 3)
    assert run.ranking == {"q": ["a", "c", "b", "d", "e", "f"]} and run.pairs_per_stage == [3, 3]
    # Three stages: the last stage's order, then stage 2's leftovers, then stage 1's, then below K.
    run = cascade_ranking(first, [s1, s2, s3], [4, 2, None], 5)
    # stage 1: e b c d a -> keeps e b c d; stage 2: e d c b (e=9 before d=7; c=2, b=1) -> keeps e d; stage 3: d
    # scored 0, e unscored (last) -> d e; then stage 2's leftovers c b; then stage 1's a; then f.
    assert run.ranking == {"q": ["d", "e", "c", "b", "a", "f"]} and run.pairs_per_stage == [5, 4, 1]


def test_cascade_entries_validated():
    m = {"name_or_path": "m"}
    ok = {
        "rerankers": [{"name": "a", "model": m}, {"name": "c", "cascade": [{"reranker": "a", "keep": 5}, {"model": m}]}]
    }
    assert [s.name for s in validate_config(EvalConfig, ok).rerankers[1].cascade] == ["a", "stage2"]
    bad = {
        "rerankers": [
            {"name": "a", "model": m},
            {"name": "c", "cascade": [{"reranker": "x", "keep": 5}, {"reranker": "a"}]},
        ]
    }
    with pytest.raises(ConfigError, match="'x', which is not in rerankers"):
        validate_config(EvalConfig, bad)
    rising = {"rerankers": [{"name": "c", "cascade": [{"model": m, "keep": 5}, {"model": m, "keep": 9}, {"model": m}]}]}
    with pytest.raises(ConfigError, match="no larger than the one before"):
        validate_config(EvalConfig, rising)


def test_submit_checks_every_model_of_a_cascade(tmp_path):
    """rerank submit checks an eval's model paths on this machine first: a cascade's own stage models included."""
    from pipelines.cli import submit

    local = tmp_path / "m"
    local.mkdir()
    conf = tmp_path / "eval.yaml"
    entries = [
        {"name": "a", "model": {"name_or_path": str(local)}},
        {"name": "c", "cascade": [{"reranker": "a", "keep": 5}, {"model": {"name_or_path": "relative/model"}}]},
    ]
    conf.write_text(yaml.safe_dump({"rerankers": entries, "report": {"dir": str(tmp_path / "report")}}))
    assert submit.check_config("eval", conf, [], resume=False, plan=False).rerankers[1].cascade[1].name == "stage2"
    (tmp_path / "relative" / "model").mkdir(parents=True)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ConfigError, match=r"rerankers\[1\]\.cascade\[1\]\.model\.name_or_path=relative/model"):
            submit.check_config("eval", conf, [], resume=False, plan=False)
    finally:
        os.chdir(cwd)
