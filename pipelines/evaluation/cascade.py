"""Cascades in the evaluation: an entry of ``rerankers:`` that holds ``cascade:`` instead of ``model:``.

For each K, stage 1 orders the first-stage top K of a query by its scores and passes its top ``keep`` on; stage 2
orders only those, and so on (a ``keep`` >= what a stage received passes everything). The cascade's ranking is
the last stage's order of what it scored; below it come the candidates each earlier stage scored but did not pass
on (the latest stage's leftovers first, each in the order of the stage that cut them), then the first stage's
order below K, so every run has K_max results like a single reranker's and for N <= the last stage's input the
LLM gets only what the last model ordered. Within a stage, ties and candidates the model could not score (a pair
the job rejected) keep the order the stage received them in, unscored last, as for a single reranker.

A pair's score does not depend on the other candidates, so a stage reuses the scores of any entry (or earlier
stage) with the same model section: a model evaluated as a single entry is never scored twice. The compute of a
cascade at K is still what a pipeline running it would pay: the sum over stages of the pairs that stage scores at
that K times that model's measured seconds per pair (1 / the pairs/s of the batch job that scored it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import ModelConfig, RerankerSpec
from pipelines.evaluation.metrics import NonFiniteScoreError, Ranking

Scores = dict[str, dict[str, float]]
"""query id -> doc id -> a model's score."""


@dataclass(frozen=True)
class Stage:
    """One stage of a cascade as the evaluation runs it."""

    name: str
    model: ModelConfig
    keep: int | None
    reranker: str | None  # the rerankers: entry it names, if any


def model_key(model: ModelConfig) -> str:
    """Two model sections with this same key score every pair the same: their scores are shared."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True)


def cascade_stages(spec: RerankerSpec, specs: Sequence[RerankerSpec]) -> list[Stage]:
    """The stages of a cascade entry, each with its model (a stage that names an entry takes that entry's)."""
    models = {s.name: s.model for s in specs if s.model is not None}
    out = []
    for stage in spec.cascade or []:
        model = stage.model if stage.model is not None else models[stage.reranker]  # type: ignore[index]
        out.append(Stage(stage.name or stage.reranker or "", model, stage.keep, stage.reranker))  # type: ignore[arg-type]
    return out


def spec_models(spec: RerankerSpec, specs: Sequence[RerankerSpec]) -> list[ModelConfig]:
    """Every model an entry runs: its model, or its cascade's stages' models."""
    return [spec.model] if spec.model is not None else [s.model for s in cascade_stages(spec, specs)]


def describe(spec: RerankerSpec, specs: Sequence[RerankerSpec]) -> str:
    """`small (keep 20) -> big` for a cascade, the model's name_or_path for a single model."""
    if spec.model is not None:
        return spec.model.name_or_path
    return " -> ".join(
        (s.reranker or s.model.name_or_path) + (f" (keep {s.keep})" if s.keep is not None else "")
        for s in cascade_stages(spec, specs)
    )


def _order(pool: list[str], s: dict[str, float], reranker: str, stage: str, q: str) -> list[str]:
    bad = next((d for d in pool if d in s and not math.isfinite(s[d])), None)
    if bad is not None:
        raise NonFiniteScoreError(
            f"reranker {reranker}, stage {stage}: query {q}, document {bad} has the score {s[bad]}; refusing to "
            "rank by a score that is not a finite number"
        )
    scored = sorted((d for d in pool if d in s), key=lambda d: -s[d])  # stable: ties keep the order received
    return scored + [d for d in pool if d not in s]


def stage_pools(
    docs: list[str],
    k: int,
    scores: Sequence[dict[str, float]],
    keeps: Sequence[int | None],
    reranker: str = "cascade",
    names: Sequence[str] = (),
    q: str = "",
) -> tuple[list[list[str]], list[list[str]]]:
    """One query at one K: (pools, orders). pools[i] is what stage i receives (pools[0] = the first-stage top k),
    orders[i] its order of it by scores[i]. With fewer score dicts than stages, pools runs one stage further than
    orders (what the next stage would receive)."""
    pools = [docs[:k]]
    orders: list[list[str]] = []
    for i, s in enumerate(scores):
        orders.append(_order(pools[i], s, reranker, names[i] if i < len(names) else f"stage{i + 1}", q))
        if i < len(keeps) and keeps[i] is not None:
            pools.append(orders[i][: keeps[i]])
        elif i + 1 < len(keeps):
            raise ValueError(f"stage {i + 1} of {reranker} has no keep but is not the last")
    return pools, orders


@dataclass
class CascadeRun:
    """A cascade at one K: its ranking and the pairs each stage scored (summed over queries)."""

    ranking: Ranking
    pairs_per_stage: list[int] = field(default_factory=list)


def cascade_ranking(
    first: Ranking,
    stage_scores: Sequence[Scores],
    keeps: Sequence[int | None],
    k: int,
    reranker: str = "cascade",
    names: Sequence[str] = (),
) -> CascadeRun:
    """The cascade's run at K (see the module's docstring) and the pairs each stage scored: the candidates it
    received that its model gave a score (a pair the job rejected costs nothing, as for a single reranker)."""
    out: Ranking = {}
    pairs = [0] * len(stage_scores)
    for q, docs in first.items():
        per_q = [s.get(q, {}) for s in stage_scores]
        pools, orders = stage_pools(docs, k, per_q, keeps, reranker, names, q)
        for i, s in enumerate(per_q):
            pairs[i] += sum(1 for d in pools[i] if d in s)
        ranking = list(orders[-1])
        for i in range(len(orders) - 2, -1, -1):  # what each earlier stage scored but did not pass on
            ranking += orders[i][keeps[i] :]  # type: ignore[misc]
        out[q] = ranking + docs[k:]
    return CascadeRun(out, pairs)


def needed_pairs(
    first: Ranking, stage_scores: Sequence[Scores], keeps: Sequence[int | None], k_values: Sequence[int]
) -> dict[str, list[str]]:
    """What the next stage (after ``stage_scores``) receives for some K, per query, in first-stage order: the
    pairs its model must score."""
    j = len(stage_scores)
    out: dict[str, list[str]] = {}
    for q, docs in first.items():
        per_q = [s.get(q, {}) for s in stage_scores]
        want: set[str] = set()
        for k in k_values:
            pools, _ = stage_pools(docs, k, per_q, keeps, q=q)
            want.update(pools[j])
        out[q] = [d for d in docs if d in want]
    return out


@dataclass
class ModelScores:
    """Every score one model section has given in this evaluation, from one or more batch jobs."""

    scores: Scores
    attempted: dict[str, set[str]]  # pairs sent to a job, scored or rejected
    pairs: int = 0  # pairs the jobs scored
    seconds: float = 0.0  # pairs / pairs_per_s summed over the jobs: their measured scoring time
    jobs: list[str] = field(default_factory=list)  # job folders in the report
    pairs_per_s_measured: list[float] = field(default_factory=list)

    def add(self, scores: Scores, sent: dict[str, list[str]], summary: Any, job: str) -> None:
        for q, ds in scores.items():
            self.scores.setdefault(q, {}).update(ds)
        for q, ds in sent.items():
            self.attempted.setdefault(q, set()).update(ds)
        n = int(summary.pairs_scored)
        self.pairs += n
        pps = float(summary.pairs_per_s or 0.0)
        self.pairs_per_s_measured.append(pps)
        self.seconds += n / pps if pps else 0.0
        self.jobs.append(job)

    @property
    def pairs_per_s(self) -> float:
        """The measured throughput (one job: its pairs/s exactly; several: their pairs over their time)."""
        if len(self.pairs_per_s_measured) == 1:
            return self.pairs_per_s_measured[0]
        return self.pairs / self.seconds if self.seconds else 0.0

    @property
    def seconds_per_pair(self) -> float | None:
        pps = self.pairs_per_s
        return 1.0 / pps if pps else None

    def missing(self, need: dict[str, list[str]]) -> dict[str, list[str]]:
        return {q: m for q, ds in need.items() if (m := [d for d in ds if d not in self.attempted.get(q, set())])}


@dataclass
class CascadeFigures:
    """A cascade entry after the sweep: its stages, the pairs each scored at each K, and each stage's model's
    scores (with the measured throughput)."""

    stages: list[Stage]
    pairs_per_stage: dict[int, list[int]]
    models: list[ModelScores]

    def stage_seconds(self, k: int) -> list[float | None]:
        """Each stage's compute at K: its pairs times its model's measured seconds per pair."""
        return [
            None if m.seconds_per_pair is None else n * m.seconds_per_pair
            for n, m in zip(self.pairs_per_stage[k], self.models)
        ]

    def seconds(self) -> dict[int, float | None]:
        """The cascade's compute at each K: the sum over its stages (None if a stage's throughput is unknown)."""
        out: dict[int, float | None] = {}
        for k in self.pairs_per_stage:
            parts = self.stage_seconds(k)
            out[k] = None if any(p is None for p in parts) else sum(parts)  # type: ignore[arg-type]
        return out


def default_tokenizer(config: Any) -> str:
    """cost.tokenizer, else the first entry's (first) model."""
    return config.cost.tokenizer or spec_models(config.reranker_specs[0], config.reranker_specs)[0].name_or_path
