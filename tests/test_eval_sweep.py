"""`rerank eval` end to end on a slice of Cranfield with a tiny cross-encoder, through the CLI and the batch job.

Every reported figure is recomputed here from the files the report names (run files, qrels.txt), the way an
independent check would: measures with ir_measures, tokens with the tokenizer, N_Reranked from the curves.
"""

from __future__ import annotations

import json
from pathlib import Path

import ir_measures
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.io.collections import load_cranfield, read_trec_qrels, read_trec_run

pytestmark = pytest.mark.timeout(300)

QUERIES, K_VALUES, N_GRID, N_BASE = 20, [5, 20], [1, 5, 10, 20], [5, 10]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.tiny_models import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("models") / "ce")


def _args(config: Path, model_dir: Path, report_dir: Path, *extra: str) -> list[str]:
    return [
        "eval", str(config),
        "--set", f"model.name_or_path={model_dir}", "--set", "model.kind=cross-encoder",
        "--set", "model.max_length=128", "--set", f"report.dir={report_dir}",
        "--set", "scale.num_actors=1", "--set", "scale.num_cpus_per_actor=0.5",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def report(ray_cluster, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report"
    conf = Path(__file__).parent.parent / "conf" / "eval_cranfield.yaml"
    rc = main(
        _args(
            conf, model_dir, out,
            "--set", f"data.max_queries={QUERIES}", "--set", f"k_values={K_VALUES}",
            "--set", f"n_grid={N_GRID}", "--set", f"n_base={N_BASE}", "--set", "first_stage.depth=20",
            "--set", "cost.price_per_million_tokens=2.5",
        )
    )  # fmt: skip
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_files(report):
    out, rep = report
    assert (out / "report.md").read_text().startswith("# What reranking buys: cranfield")
    assert (out / "quality_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["first_stage.run", "rerank_k20.run", "rerank_k5.run"]
    assert rep["collection"]["queries_evaluated"] == QUERIES
    assert set(rep["runs"]) == {"first_stage", "rerank_k5", "rerank_k20"}
    assert not (out / "_work").exists()


def test_figures_recomputed_from_run_files(report):
    out, rep = report
    qrels = read_trec_qrels(out / "qrels.txt")
    coll = load_cranfield()
    assert qrels == {q: coll.qrels[q] for q in qrels} and len(qrels) == QUERIES
    for name, run in rep["runs"].items():
        measures = run["measures"]
        parsed = [ir_measures.parse_measure(m) for m in measures]
        recomputed = ir_measures.calc_aggregate(parsed, qrels, list(ir_measures.read_trec_run(str(out / run["file"]))))
        assert {str(k): v for k, v in recomputed.items()} == pytest.approx(measures, abs=1e-12), name
        for key in ("nDCG@10", "RR@10", *[f"R@{n}" for n in N_GRID], *[f"Success@{n}" for n in N_GRID]):
            assert key in measures


def test_runs_keep_first_stage_outside_the_top_k(report):
    out, _ = report
    first = read_trec_run(out / "runs" / "first_stage.run")
    assert len(first) == QUERIES and all(len(v) == 20 for v in first.values())
    for k in K_VALUES:
        rer = read_trec_run(out / "runs" / f"rerank_k{k}.run")
        for q, docs in first.items():
            ids, rids = [d for d, _ in docs], [d for d, _ in rer[q]]
            assert sorted(rids[:k]) == sorted(ids[:k]) and rids[k:] == ids[k:]


def test_deepest_k_is_the_batch_jobs_own_ranking(report):
    out, rep = report
    job = pq.read_table(out / "rerank_job", columns=["query_id", "doc_id", "rank"]).to_pylist()
    by_job: dict[str, list[tuple[int, str]]] = {}
    for row in job:
        by_job.setdefault(row["query_id"], []).append((row["rank"], row["doc_id"]))
    rer = read_trec_run(out / "runs" / "rerank_k20.run")
    coll = load_cranfield()
    for q, docs in rer.items():
        scored = [d for d, _ in docs if coll.corpus[d].strip()]  # empty abstracts are rejected by the job
        assert [d for _, d in sorted(by_job[q])] == scored
    assert rep["reranker"]["pairs_scored"] == len(job)
    assert rep["runs"]["rerank_k20"]["reranker_pairs_scored"] == len(job)


def test_tokens_and_tradeoff_recomputed(report, model_dir):
    from transformers import AutoTokenizer

    out, rep = report
    tok = AutoTokenizer.from_pretrained(model_dir)
    coll = load_cranfield()

    def tokens(run_file: str, n: int) -> int:
        run = read_trec_run(out / run_file)
        return sum(
            len(tok(coll.corpus[d], add_special_tokens=False)["input_ids"])
            for docs in run.values()
            for d, _ in docs[:n]
        )

    for name, run in rep["runs"].items():
        for n in N_GRID:
            assert run["llm_context"][str(n)]["total_tokens"] == tokens(run["file"], n), (name, n)
            assert run["llm_context"][str(n)]["cost_total"] == pytest.approx(tokens(run["file"], n) * 2.5 / 1e6)
    assert len(rep["tradeoff"]) == len(N_BASE) * len(K_VALUES)
    for row in rep["tradeoff"]:
        first = rep["runs"]["first_stage"]["measures"]
        mine = rep["runs"][f"rerank_k{row['k']}"]["measures"]
        base = first[f"R@{row['n_base']}"]
        assert row["first_stage_quality_at_n_base"] == base
        assert row["reranked_quality_at_n_base"] == mine[f"R@{row['n_base']}"]
        reached = [n for n in range(1, 21) if mine[f"R@{n}"] >= base - 1e-9]
        assert row["n_reranked"] == (reached[0] if reached else None)
        if row["n_reranked"]:
            want = tokens(f"runs/rerank_k{row['k']}.run", row["n_reranked"])
            assert row["llm_reranked_at_n_reranked"]["total_tokens"] == want
        assert row["llm_first_stage_at_n_base"]["total_tokens"] == tokens("runs/first_stage.run", row["n_base"])
        assert row["reranker_pairs_scored"] == rep["runs"][f"rerank_k{row['k']}"]["reranker_pairs_scored"]


def test_given_run_file_as_first_stage(report, model_dir, tmp_path):
    out, _ = report
    conf = tmp_path / "eval.yaml"
    conf.write_text(
        "data: {format: cranfield, max_queries: 5}\n"
        f"first_stage: {{kind: run, run: {out / 'runs' / 'first_stage.run'}, depth: 10}}\n"
        "model: {name_or_path: unused}\nk_values: [5]\nn_grid: [5, 10]\nn_base: [5]\n"
    )
    out2 = tmp_path / "report"
    assert main(_args(conf, model_dir, out2)) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    first = read_trec_run(out / "runs" / "first_stage.run")
    again = read_trec_run(out2 / "runs" / "first_stage.run")
    assert {q: [d for d, _ in v] for q, v in again.items()} == {q: [d for d, _ in first[q][:10]] for q in again}
    assert rep2["settings"]["first_stage"]["kind"] == "run"
    # The same model scores the same pairs: the top-5 reranking agrees with the first report's K=5 run.
    k5 = read_trec_run(out / "runs" / "rerank_k5.run")
    again5 = read_trec_run(out2 / "runs" / "rerank_k5.run")
    assert {q: [d for d, _ in v][:5] for q, v in again5.items()} == {q: [d for d, _ in k5[q]][:5] for q in again5}
    # A second run into the same folder fails unless overwrite is asked for.
    assert main(_args(conf, model_dir, out2, "--set", "report.mode=error")) == 2


def test_bad_config_fails_before_any_work(capsys, tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text("model: {name_or_path: x}\nk_values: [0]\n")
    assert main(["eval", str(conf)]) == 2
    assert "k_values" in capsys.readouterr().err
