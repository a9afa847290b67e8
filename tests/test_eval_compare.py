"""`rerank eval` with two named rerankers (a tiny cross-encoder and a tiny causal-LM reranker) over the same
first-stage candidates, every side-by-side figure recomputed from the files the report names."""

from __future__ import annotations

import json

import ir_measures
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import main
from pipelines.config import EvalConfig, validate_config
from pipelines.errors import ConfigError
from pipelines.io.collections import read_trec_qrels, read_trec_run

pytestmark = pytest.mark.timeout(400)

K_VALUES, N_GRID, N_BASE, DEPTH, QUERIES = [3, 10], [1, 3, 5, 10], [5], 10, 8
PROMPT = "<|im_start|>user\nQuery: {query}\nDocument: {text}\nRelevant?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def report(ray_local, tmp_path_factory):
    from tests.tiny_models import build_causal_lm, build_cross_encoder

    models = tmp_path_factory.mktemp("models")
    ce = build_cross_encoder(models / "ce")
    llm = build_causal_lm(models / "llm")
    out = tmp_path_factory.mktemp("eval") / "report"
    conf = out.parent / "eval.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "data": {"format": "cranfield", "max_queries": QUERIES},
                "first_stage": {"kind": "bm25", "depth": DEPTH},
                "rerankers": [
                    {"name": "tiny-ce", "model": {"name_or_path": str(ce), "max_length": 128}},
                    {
                        "name": "tiny-llm",
                        "model": {
                            "name_or_path": str(llm),
                            "kind": "causal-lm",
                            "prompt_template": PROMPT,
                            "max_length": 256,
                            "batch_size": 8,
                        },
                    },
                ],
                "k_values": K_VALUES,
                "n_grid": N_GRID,
                "n_base": N_BASE,
                "cost": {"tokenizer": str(ce), "reranker_price_per_hour": 3.6},
                "report": {"dir": str(out)},
                "scale": {"num_actors": 1, "num_cpus_per_actor": 0.5},
            }
        )
    )
    assert main(["eval", str(conf)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_runs_and_files_per_reranker(report):
    out, rep = report
    names = {f"{r}_k{k}" for r in ("tiny-ce", "tiny-llm") for k in K_VALUES}
    assert set(rep["runs"]) == names | {"first_stage"}
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{n}.run" for n in names | {"first_stage"})
    assert set(rep["rerankers"]) == {"tiny-ce", "tiny-llm"}
    assert rep["rerankers"]["tiny-llm"]["kind"] == "causal-lm"
    assert (out / "quality_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Rerankers side by side" in md
    assert all(f"| {r} | {k} |" in md for r in ("tiny-ce", "tiny-llm") for k in K_VALUES)
    assert len(rep["tradeoff"]) == 2 * len(K_VALUES) * len(N_BASE)


def test_side_by_side_figures_recomputed_from_files(report):
    out, rep = report
    qrels = read_trec_qrels(out / "qrels.txt")
    first = read_trec_run(out / "runs" / "first_stage.run")
    for name, fig in rep["rerankers"].items():
        job = out / fig["job_output"]
        summary = json.loads((job / "_summary.json").read_text())
        assert fig["pairs_per_s"] == pytest.approx(summary["pairs_per_s"])
        scores: dict[str, dict[str, float]] = {}
        for row in pq.read_table(job, columns=["query_id", "doc_id", "score"]).to_pylist():
            scores.setdefault(row["query_id"], {})[row["doc_id"]] = row["score"]
        for k in K_VALUES:
            run_name = f"{name}_k{k}"
            run = read_trec_run(out / "runs" / f"{run_name}.run")
            # The run is the first stage's top K ordered by this reranker's job scores (ties: first-stage order).
            for q, docs in first.items():
                ids = [d for d, _ in docs]
                head = sorted((d for d in ids[:k] if d in scores.get(q, {})), key=lambda d: -scores[q][d])
                head += [d for d in ids[:k] if d not in scores.get(q, {})]
                assert [d for d, _ in run[q]] == head + ids[k:], (run_name, q)
            measures = rep["runs"][run_name]["measures"]
            parsed = [ir_measures.parse_measure(m) for m in measures]
            again = ir_measures.calc_aggregate(
                parsed, qrels, list(ir_measures.read_trec_run(str(out / "runs" / f"{run_name}.run")))
            )
            assert {str(m): v for m, v in again.items()} == pytest.approx(measures, abs=1e-12)
            pairs = sum(1 for q, docs in first.items() for d, _ in docs[:k] if d in scores.get(q, {}))
            at_k = fig["at_k"][str(k)]
            assert at_k["pairs_scored"] == pairs
            seconds = 1000 * pairs / QUERIES / summary["pairs_per_s"]
            assert at_k["seconds_per_1000_queries"] == pytest.approx(seconds)
            assert at_k["cost_per_1000_queries"] == pytest.approx(seconds / 3600 * 3.6)
            for row in (t for t in rep["tradeoff"] if t["reranker"] == name and t["k"] == k):
                base = rep["runs"]["first_stage"]["measures"][f"R@{row['n_base']}"]
                reached = [n for n in range(1, DEPTH + 1) if measures[f"R@{n}"] >= base - 1e-9]
                assert row["n_reranked"] == (reached[0] if reached else None)


def test_one_model_or_named_rerankers():
    one = {"model": {"name_or_path": "m"}}
    assert [s.name for s in validate_config(EvalConfig, one).reranker_specs] == ["rerank"]
    both = one | {"rerankers": [{"name": "a", "model": {"name_or_path": "m"}}]}
    with pytest.raises(ConfigError, match="not both"):
        validate_config(EvalConfig, both)
    with pytest.raises(ConfigError, match="not both"):
        validate_config(EvalConfig, {})
    twice = {"rerankers": [{"name": "a", "model": {"name_or_path": "m"}}] * 2}
    with pytest.raises(ConfigError, match="'a' is used twice"):
        validate_config(EvalConfig, twice)
    with pytest.raises(ConfigError, match="rerankers.0.name"):
        validate_config(EvalConfig, {"rerankers": [{"name": "a/b", "model": {"name_or_path": "m"}}]})


def test_single_model_keeps_its_names():
    """One `model:` still writes rerank_k<K> runs and rerank_job/, as before."""
    from pipelines.evaluation.sweep import job_dir_name, run_name

    cfg = validate_config(EvalConfig, {"model": {"name_or_path": "m"}})
    assert run_name(5, cfg.reranker_specs[0].name) == "rerank_k5" and job_dir_name(cfg, "rerank") == "rerank_job"
