"""Measures through ir_measures (pytrec_eval underneath); nothing here computes a metric by hand.

A ranking is a list of doc ids best first. It is handed to ir_measures, and written to run files, with the
scores ``n, n-1, ..., 1`` (n = its length): strictly decreasing, so every TREC tool reads the same order and
the figures can be recomputed from the run files exactly. Queries without any result count as 0 (the
average is over every evaluated query, like ``trec_eval -c``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pipelines.errors import RerankError
from pipelines.io.collections import Qrels


class NonFiniteScoreError(RerankError):
    """A model (a reranker, or a dense first stage) scored a pair NaN or infinite: the evaluation refuses to rank
    by it rather than measure a ranking the score cannot order. The message names the model and the query."""


Ranking = dict[str, list[str]]
"""query id -> doc ids, best first."""


def rank_scores(docs: Sequence[str]) -> dict[str, float]:
    """The scores a ranking is evaluated and written with: n for the first, 1 for the last."""
    n = len(docs)
    return {d: float(n - i) for i, d in enumerate(docs)}


def measure_names(n_grid: Iterable[int], quality_measure: str = "R", depth: int = 0) -> list[str]:
    """nDCG@10, RR@10 (MRR@10), R@N and Success@N (hit@N) over the grid, and the quality measure at every N up
    to depth (the N_Reranked search needs the whole curve). Names are ir_measures' own."""
    names = ["nDCG@10", "RR@10"]
    grid = sorted(set(n_grid))
    names += [f"R@{n}" for n in grid] + [f"Success@{n}" for n in grid]
    names += [f"{quality_measure}@{n}" for n in range(1, depth + 1)]
    return list(dict.fromkeys(names))


def evaluate(ranking: Ranking, qrels: Qrels, query_ids: Sequence[str], measures: Sequence[str]) -> dict[str, float]:
    """Mean of each measure over ``query_ids`` (a query missing from the ranking, or with an empty one, is 0)."""
    import ir_measures

    parsed = {ir_measures.parse_measure(m): m for m in measures}
    qids = list(dict.fromkeys(query_ids))
    wanted = set(qids)
    run = {q: rank_scores(docs) for q, docs in ranking.items() if q in wanted and docs}
    judged = {q: {d: int(g) for d, g in qrels.get(q, {}).items()} for q in qids if q in qrels}
    totals = {name: 0.0 for name in parsed.values()}
    if run and judged:
        for m in ir_measures.iter_calc(list(parsed), judged, run):
            totals[parsed[m.measure]] += m.value
    return {name: totals[name] / len(qids) if qids else 0.0 for name in parsed.values()}
