"""The evaluation sweep: first stage -> one reranking job -> a ranking per K -> measures, tokens, trade-off.

How K is swept with one job: a reranker's score of a (query, passage) pair does not depend on which other
candidates it is ranked with, so the first stage's top K_max (first_stage.depth) is scored once by the batch
job (the same Ray Data code path as ``rerank run``) and the run for each K reorders only the first-stage top K
by those scores. Ties keep first-stage order, as the job's own top-N does. Below the top K the first-stage
order continues, so every run has K_max results and any N can be compared; for N <= K the LLM gets reranked
chunks only. The reranker cost of a K is what a pipeline reranking K candidates would pay: the pairs in each
query's top K, at the job's measured throughput.

Candidates the job rejects (empty text) keep no score; they sort after the scored ones within the top K. A
candidate the reranker scores NaN or infinite is different: it is a fault of the model, not of the input, and no
ranking can place it, so the evaluation refuses (``NonFiniteScoreError``: one line naming the reranker, its model
and the first query) instead of measuring a ranking around it. The job rejects such pairs with reason
``score_not_finite``; they stay in the job's ``_rejects/`` in the report folder.

Several rerankers (``rerankers: [{name, model}, ...]``) are each scored by their own job over the same first-stage
candidates; their runs are named ``<name>_k<K>`` (one ``model:`` is the reranker named ``rerank``), so quality,
N_Reranked, tokens and each reranker's measured throughput and cost are reported side by side. An entry with
``cascade:`` instead of ``model:`` is ranked per K by ``pipelines.evaluation.cascade`` from the scores of its stages'
models: an entry's scores are reused, a stage with a model no entry has is scored by its own job over only what
reaches that stage (``rerank_job_<cascade>.<stage>``); its compute at K is each stage's pairs at that model's
measured pairs/s, summed.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import EvalConfig, EvalDataConfig, InputConfig, OutputConfig, RerankJobConfig
from pipelines.errors import InputError, OutputError
from pipelines.evaluation.cascade import (
    CascadeFigures,
    ModelScores,
    cascade_ranking,
    cascade_stages,
    default_tokenizer,
    model_key,
    needed_pairs,
)
from pipelines.evaluation.costs import context_tokens, count_tokens, token_summary
from pipelines.evaluation.metrics import NonFiniteScoreError, Ranking, evaluate, measure_names
from pipelines.evaluation.report import job_dir_name, run_name
from pipelines.io import collections as loaders
from pipelines.io.collections import Collection, RankedRun

log = logging.getLogger(__name__)

FIRST_STAGE = "first_stage"
_MARKER = ".rerank-eval"
_EPS = 1e-9  # means of the same per-query values summed in another order may differ in the last bits


@dataclass
class EvalResult:
    report: dict[str, Any]
    markdown: str
    report_dir: Path


# ---------------------------------------------------------------------------------------------------- inputs


def load_collection(data: EvalDataConfig) -> Collection:
    """The collection named by the ``data`` section."""
    grades = data.relevance_map
    if data.format == "cranfield":
        return loaders.load_cranfield(data.path)
    if data.format == "beir":
        coll = loaders.load_beir(data.path, data.split, data.title)  # type: ignore[arg-type]
        if grades:
            coll.qrels = loaders.read_beir_qrels(Path(data.path) / "qrels" / f"{data.split}.tsv", grades)  # type: ignore[arg-type]
        return coll
    if data.format == "smart":
        return loaders.load_smart_collection(
            data.corpus,
            data.queries,
            data.qrels,
            query_ids=data.smart_query_ids,
            grades=grades,  # type: ignore[arg-type]
            name=Path(data.corpus).stem,  # type: ignore[arg-type]
        )
    return Collection(
        corpus=loaders.read_corpus(data.corpus, data.title),  # type: ignore[arg-type]
        queries=loaders.read_queries(data.queries),  # type: ignore[arg-type]
        qrels=loaders.read_qrels(data.qrels, grades),  # type: ignore[arg-type]
        name=Path(data.corpus).stem,  # type: ignore[arg-type]
    )


def evaluated_queries(coll: Collection, max_queries: int | None) -> list[str]:
    qids = coll.judged_queries()
    if not qids:
        raise InputError(
            f"{coll.name}: no query has both text and a relevant judgment; check that query ids in the qrels "
            "match the queries file (and data.smart_query_ids for SMART collections)"
        )
    return qids[:max_queries] if max_queries else qids


def first_stage_candidates(config: EvalConfig, coll: Collection, qids: list[str]) -> tuple[RankedRun, dict[str, Any]]:
    from pipelines.evaluation import first_stage as fs

    fsc = config.first_stage
    queries = {q: coll.queries[q] for q in qids}
    info: dict[str, Any] = {"kind": fsc.kind, "depth": config.depth}
    if fsc.kind == "bm25":
        run = fs.bm25_retrieve(coll.corpus, queries, config.depth, fsc.bm25)
        info["bm25"] = fsc.bm25.model_dump()
    elif fsc.kind == "dense":
        run = fs.dense_retrieve(coll.corpus, queries, config.depth, fsc.model)  # type: ignore[arg-type]
        info["model"] = fsc.model.name_or_path  # type: ignore[union-attr]
    else:
        run, dropped = fs.run_file_candidates(fsc.run, coll.corpus, qids, config.depth)  # type: ignore[arg-type]
        info.update(run_file=fsc.run, results_not_in_corpus=dropped)
    return run, info


# ---------------------------------------------------------------------------------------------------- scoring


def score_candidates(
    config: EvalConfig,
    coll: Collection,
    ranking: Ranking,
    work_dir: Path,
    job_dir: Path,
    model: Any = None,
    reranker: str = "rerank",
) -> tuple[dict[str, dict[str, float]], Any]:
    """Score every first-stage candidate once with the batch job; returns query -> doc -> score and the
    job's summary. Ray must be running (the entry point starts it). A pair scored NaN or infinite (which the job
    rejects as score_not_finite) fails the evaluation with ``NonFiniteScoreError`` naming `reranker`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.job import run_rerank

    cand_dir = work_dir / "candidates"
    cand_dir.mkdir(parents=True, exist_ok=True)
    qids = [q for q in ranking if ranking[q]]
    # Packed layout (a row per query, its candidates in a list): the job scores whole queries per actor call
    # and needs no shuffle.
    struct = pa.struct([("doc_id", pa.string()), ("text", pa.string()), ("first_stage_rank", pa.int32())])
    table = pa.table(
        {
            "query_id": pa.array(qids, pa.string()),
            "query": pa.array([coll.queries[q] for q in qids], pa.string()),
            "candidates": pa.array(
                [
                    [{"doc_id": d, "text": coll.corpus[d], "first_stage_rank": r} for r, d in enumerate(ranking[q], 1)]
                    for q in qids
                ],
                pa.list_(struct),
            ),
        }
    )
    pq.write_table(table, cand_dir / "candidates.parquet")
    model = model or config.reranker_specs[0].model
    job = RerankJobConfig(
        input=InputConfig(uri=str(cand_dir)),
        output=OutputConfig(uri=str(job_dir), top_n=max(len(v) for v in ranking.values()), mode="overwrite"),
        model=model,
        scale=config.scale,
        ray=config.ray,
    )
    summary = run_rerank(job)
    shutil.rmtree(cand_dir, ignore_errors=True)
    refuse_non_finite_rejects(reranker, model.name_or_path, summary, job_dir)
    out = pq.read_table(job_dir, columns=["query_id", "doc_id", "score"])
    scores: dict[str, dict[str, float]] = {}
    for q, d, s in zip(*(out.column(c).to_pylist() for c in ("query_id", "doc_id", "score"))):
        if s is None or not math.isfinite(s):
            raise NonFiniteScoreError(
                f"reranker {reranker} (model {model.name_or_path}): query {q}, document {d} has the score {s} in "
                f"{job_dir}; refusing to rank by a score that is not a finite number"
            )
        scores.setdefault(str(q), {})[str(d)] = float(s)
    return scores, summary


def refuse_non_finite_rejects(reranker: str, model: str, summary: Any, job_dir: Path) -> None:
    """Raise ``NonFiniteScoreError`` when the job rejected pairs because the reranker scored them NaN or infinite
    (reason score_not_finite): one line naming the reranker, its model, how many pairs and the first query. The
    job goes on past such pairs (they are in its ``_rejects/``); a measurement that ranked them anywhere would
    report a quality the model did not have."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.io.rows import NAN_SCORE

    counted = int((getattr(summary, "rejected_by_reason", None) or {}).get(NAN_SCORE, 0))
    pairs: list[tuple[str, str]] = []
    folder = job_dir / "_rejects"
    try:
        if folder.is_dir() and any(folder.glob("*.parquet")):
            rejects = pq.read_table(folder, columns=["query_id", "doc_id", "reason"])
            rejects = rejects.filter(pc.equal(rejects.column("reason"), NAN_SCORE))
            pairs = list(zip(*(map(str, rejects.column(c).to_pylist()) for c in ("query_id", "doc_id"))))
    except Exception as err:  # noqa: BLE001 - the count from the summary still says enough to refuse
        log.warning("could not read the rejects in %s: %s", folder, err)
    n = max(counted, len(pairs))
    if not n:
        return
    where = ""
    if pairs:
        queries = sorted({q for q, _ in pairs}, key=loaders._natural_key)
        first_doc = min(d for q, d in pairs if q == queries[0])
        where = f" in {len(queries)} queries, first query {queries[0]} (document {first_doc})"
    raise NonFiniteScoreError(
        f"reranker {reranker} (model {model}) scored {n} candidate pairs NaN or infinite{where}; the evaluation "
        f"refuses to rank by them (the job's rejects are in {folder}, reason {NAN_SCORE}; a float16 model may "
        "overflow where float32 does not)"
    )


def rerank_top_k(ranking: Ranking, scores: dict[str, dict[str, float]], k: int, reranker: str = "rerank") -> Ranking:
    """Each query's first-stage top k reordered by reranker score (ties and unscored docs keep first-stage
    order, unscored last), followed by the rest of the first-stage list unchanged. A NaN or infinite score is
    refused (``NonFiniteScoreError`` naming `reranker` and the query): a sort by it misorders the others."""
    out: Ranking = {}
    for q, docs in ranking.items():
        s = scores.get(q, {})
        head = docs[:k]
        bad = next((d for d in head if d in s and not math.isfinite(s[d])), None)
        if bad is not None:
            raise NonFiniteScoreError(
                f"reranker {reranker}: query {q}, document {bad} has the score {s[bad]}; refusing to rank by a "
                "score that is not a finite number"
            )
        scored = sorted((d for d in head if d in s), key=lambda d: -s[d])  # stable: ties keep first-stage order
        unscored = [d for d in head if d not in s]
        out[q] = scored + unscored + docs[k:]
    return out


# ---------------------------------------------------------------------------------------------------- the sweep


def prepare_report_dir(path: str, mode: str) -> Path:
    d = Path(path).expanduser()
    if d.exists() and any(d.iterdir()):
        if mode == "error":
            raise OutputError(f"report folder {d} is not empty; set report.mode: overwrite or pick another report.dir")
        if not (d / _MARKER).exists():
            raise OutputError(
                f"report folder {d} is not empty and holds no earlier evaluation report; refusing to delete it"
            )
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / _MARKER).write_text("written by rerank eval; report.mode overwrite may delete this folder\n")
    return d


def tradeoff(
    measures: dict[str, dict[str, float]],
    tokens: dict[str, Any],
    pairs: dict[int, int],
    config: EvalConfig,
    pairs_per_s: float | None,
    reranker: str = "rerank",
    seconds: dict[int, float | None] | None = None,
) -> list[dict[str, Any]]:
    """The three answers for every (N_Base, K) of one reranker. Its compute at K: `seconds[k]` (a cascade's, summed
    over its stages), else its pairs at `pairs_per_s`."""
    qm, depth, price = config.quality_measure, config.depth, config.cost.price_per_million_tokens
    rows = []
    for nb in config.n_base:
        base = measures[FIRST_STAGE][f"{qm}@{nb}"]
        base_cost = token_summary(tokens[FIRST_STAGE], nb, price)
        for k in config.k_values:
            m = measures[run_name(k, reranker)]
            target = base - config.tolerance - _EPS
            n_r = next((n for n in range(1, depth + 1) if m[f"{qm}@{n}"] >= target), None)
            # The first stage may reach its own N_Base quality with fewer chunks (nothing relevant at the last
            # ranks): savings down to this N owe nothing to reranking.
            n_first = next(n for n in range(1, nb + 1) if measures[FIRST_STAGE][f"{qm}@{n}"] >= base - _EPS)
            same_n = token_summary(tokens[run_name(k, reranker)], nb, price)
            row: dict[str, Any] = {
                "reranker": reranker,
                "n_base": nb,
                "k": k,
                "measure": qm,
                "first_stage_quality_at_n_base": base,
                "reranked_quality_at_n_base": m[f"{qm}@{nb}"],
                "gain_at_n_base": m[f"{qm}@{nb}"] - base,
                "n_reranked": n_r,
                "first_stage_n_min": n_first,
                "reranked_quality_at_n_reranked": m[f"{qm}@{n_r}"] if n_r else None,
                "llm_first_stage_at_n_base": base_cost,
                "llm_reranked_at_n_base": same_n,
                "llm_reranked_at_n_reranked": token_summary(tokens[run_name(k, reranker)], n_r, price) if n_r else None,
                "reranker_pairs_scored": pairs[k],
                "reranker_seconds_estimated": (
                    seconds[k] if seconds is not None else pairs[k] / pairs_per_s if pairs_per_s else None
                ),
            }
            if n_r:
                saved = base_cost["total_tokens"] - row["llm_reranked_at_n_reranked"]["total_tokens"]
                row["llm_tokens_saved"] = saved
                row["llm_tokens_saved_fraction"] = (
                    saved / base_cost["total_tokens"] if base_cost["total_tokens"] else 0.0
                )
                row["llm_cost_saved"] = saved * price / 1e6
            rows.append(row)
    return rows


def run_eval(config: EvalConfig) -> EvalResult:
    """Run the whole evaluation and write the report folder. Ray must be running (the entry point starts it)."""
    from pipelines.evaluation import report as rep

    started = time.perf_counter()
    timing: dict[str, float] = {}
    coll = load_collection(config.data)
    qids = evaluated_queries(coll, config.data.max_queries)
    log.info(
        "eval: %s, %d documents, %d evaluated queries, depth %d", coll.name, len(coll.corpus), len(qids), config.depth
    )
    report_dir = prepare_report_dir(config.report.dir, config.report.mode)

    t = time.perf_counter()
    first, fs_info = first_stage_candidates(config, coll, qids)
    first_ranking: Ranking = {q: [d for d, _ in first.get(q, [])] for q in qids}
    timing["first_stage_s"] = time.perf_counter() - t

    rankings: dict[str, Ranking] = {FIRST_STAGE: first_ranking}
    pairs: dict[str, dict[int, int]] = {}
    summaries: dict[str, Any] = {}
    by_model: dict[str, ModelScores] = {}  # model section -> every score it gave (shared by entries and stages)
    work = report_dir / "_work"
    everything = {q: list(docs) for q, docs in first_ranking.items()}
    for spec in config.reranker_specs:
        if spec.model is None:
            continue
        t = time.perf_counter()
        scores, summaries[spec.name] = score_candidates(
            config,
            coll,
            first_ranking,
            work,
            report_dir / job_dir_name(config, spec.name),
            model=spec.model,
            reranker=spec.name,
        )
        timing[f"rerank_job_s.{spec.name}" if config.rerankers else "rerank_job_s"] = time.perf_counter() - t
        key = model_key(spec.model)
        if key not in by_model:
            by_model[key] = ModelScores({}, {})
            by_model[key].add(scores, everything, summaries[spec.name], job_dir_name(config, spec.name))
        pairs[spec.name] = {}
        for k in config.k_values:
            rankings[run_name(k, spec.name)] = rerank_top_k(first_ranking, scores, k, reranker=spec.name)
            pairs[spec.name][k] = sum(sum(1 for d in first_ranking[q][:k] if d in scores.get(q, {})) for q in qids)
    cascades: dict[str, Any] = {}
    for spec in config.reranker_specs:
        if spec.cascade is None:
            continue
        stages = cascade_stages(spec, config.reranker_specs)
        keeps = [s.keep for s in stages]
        stage_scores: list[dict[str, dict[str, float]]] = []
        for stage in stages:
            key = model_key(stage.model)
            held = by_model.setdefault(key, ModelScores({}, {}))
            # What this stage receives for some K, given the stages before: scored only if no entry or earlier
            # stage with the same model section scored it already.
            missing = held.missing(needed_pairs(first_ranking, stage_scores, keeps, config.k_values))
            if missing:
                t = time.perf_counter()
                job = f"rerank_job_{spec.name}.{stage.name}"
                scores, summary = score_candidates(
                    config,
                    coll,
                    missing,
                    work,
                    report_dir / job,
                    model=stage.model,
                    reranker=f"{spec.name}.{stage.name}",
                )
                held.add(scores, missing, summary, job)
                timing[f"rerank_job_s.{spec.name}.{stage.name}"] = time.perf_counter() - t
            stage_scores.append(held.scores)
        names = [s.name for s in stages]
        per_k = {}
        for k in config.k_values:
            run = cascade_ranking(first_ranking, stage_scores, keeps, k, reranker=spec.name, names=names)
            rankings[run_name(k, spec.name)] = run.ranking
            per_k[k] = run.pairs_per_stage
        pairs[spec.name] = {k: sum(v) for k, v in per_k.items()}
        cascades[spec.name] = CascadeFigures(stages, per_k, [by_model[model_key(s.model)] for s in stages])
    shutil.rmtree(work, ignore_errors=True)
    rankings = {FIRST_STAGE: first_ranking} | {
        run_name(k, s.name): rankings[run_name(k, s.name)] for s in config.reranker_specs for k in config.k_values
    }

    t = time.perf_counter()
    names = measure_names(config.n_grid, config.quality_measure, config.depth)
    measures = {name: evaluate(r, coll.qrels, qids, names) for name, r in rankings.items()}
    timing["measures_s"] = time.perf_counter() - t

    t = time.perf_counter()
    candidates = {d for docs in first_ranking.values() for d in docs}
    tokenizer = default_tokenizer(config)
    doc_tokens = count_tokens({d: coll.corpus[d] for d in candidates}, tokenizer)
    tokens = {name: context_tokens(r, doc_tokens, qids, config.depth) for name, r in rankings.items()}
    timing["tokens_s"] = time.perf_counter() - t

    seconds = {
        s.name: (
            cascades[s.name].seconds()
            if s.name in cascades
            else {
                k: n / summaries[s.name].pairs_per_s if summaries[s.name].pairs_per_s else None
                for k, n in pairs[s.name].items()
            }
        )
        for s in config.reranker_specs
    }
    rows = [
        row
        for spec in config.reranker_specs
        for row in tradeoff(
            measures, tokens, pairs[spec.name], config, None, reranker=spec.name, seconds=seconds[spec.name]
        )
    ]
    timing["total_s"] = time.perf_counter() - started
    report = rep.build_report(
        config=config,
        coll=coll,
        qids=qids,
        fs_info=fs_info,
        summaries=summaries,
        measures=measures,
        tokens=tokens,
        pairs=pairs,
        seconds=seconds,
        cascades=cascades,
        rows=rows,
        timing=timing,
    )
    markdown = rep.write_report(report_dir, report, rankings, coll.qrels, qids, tokens, config)
    return EvalResult(report=report, markdown=markdown, report_dir=report_dir)
