"""First stages: BM25 (bm25s) and dense retrieval (a bi-encoder through Scorer), or a given TREC run.

Every first stage returns a :data:`RankedRun` (query id -> [(doc id, score), ...] best first) in trec_eval's
order: score descending, ties by doc id descending, so a run file written from it is read back identically. A
non-finite score is never ranked: a run file's ``nan``/``inf`` line is refused naming the file, line and query
(``read_trec_run``), a dense model's NaN cosine naming the model and query.
These run on the driver: they are the baseline, not the system under test.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pipelines.config import BM25Config, ModelConfig
from pipelines.errors import InputError
from pipelines.evaluation.metrics import NonFiniteScoreError
from pipelines.io.collections import RankedRun, read_trec_run, trec_order

log = logging.getLogger(__name__)


def _tokenize(texts: Sequence[str], stopwords: str):
    import bm25s

    return bm25s.tokenize(
        list(texts), stopwords=None if stopwords == "none" else "en", show_progress=False, return_ids=False
    )


def bm25_retrieve(
    corpus: dict[str, str],
    queries: dict[str, str],
    k: int,
    config: BM25Config | None = None,
) -> RankedRun:
    """Top-k documents per query by BM25 (bm25s). Queries with no indexed term get an empty list."""
    import bm25s

    config = config or BM25Config()
    if not corpus:
        raise InputError("the corpus is empty")
    doc_ids = list(corpus)
    model = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
    model.index(_tokenize([corpus[d] for d in doc_ids], config.stopwords), show_progress=False)
    vocab = model.vocab_dict
    qids = list(queries)
    qtokens = [[t for t in toks if t in vocab] for toks in _tokenize([queries[q] for q in qids], config.stopwords)]
    k = min(k, len(doc_ids))
    run: RankedRun = {}
    answerable = [i for i, toks in enumerate(qtokens) if toks]
    for i, q in enumerate(qids):
        if not qtokens[i]:
            log.warning("query %s has no term in the BM25 index; it gets no candidates", q)
            run[q] = []
    if answerable:
        docs, scores = model.retrieve([qtokens[i] for i in answerable], k=k, show_progress=False, n_threads=1)
        for row, i in enumerate(answerable):
            run[qids[i]] = trec_order([(doc_ids[int(d)], float(s)) for d, s in zip(docs[row], scores[row])])
    return {q: run[q] for q in qids}


def dense_retrieve(
    corpus: dict[str, str],
    queries: dict[str, str],
    k: int,
    model: ModelConfig,
    block: int = 256,
) -> RankedRun:
    """Top-k documents per query by cosine of a bi-encoder's embeddings (exact search, on the driver).

    The model's query_template and passage_template are applied, as Scorer.score does."""
    from pipelines.model.scoring import Scorer

    if model.kind != "bi-encoder":
        raise InputError("a dense first stage needs a bi-encoder model (model.kind: bi-encoder)")
    scorer = Scorer(model)
    doc_ids = list(corpus)
    log.info("dense first stage: embedding %d documents with %s", len(doc_ids), model.name_or_path)
    d_emb = scorer.embed([model.passage_template.format(text=corpus[d]) for d in doc_ids])
    qids = list(queries)
    q_emb = scorer.embed(
        [model.query_template.format(query=queries[q]) for q in qids], max_length=scorer.max_query_length
    )
    k = min(k, len(doc_ids))
    run: RankedRun = {}
    for start in range(0, len(qids), block):
        sims = q_emb[start : start + block] @ d_emb.T
        finite = np.isfinite(sims)
        if not finite.all():
            row = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise NonFiniteScoreError(
                f"dense first stage: model {model.name_or_path} gave {int((~finite[row]).sum())} documents a "
                f"non-finite cosine for query {qids[start + row]} (NaN or infinite embeddings); refusing to rank by it"
            )
        # A margin beyond k keeps boundary ties from depending on argpartition; trec_order decides them.
        take = min(len(doc_ids), k + 16)
        top = (
            np.argpartition(-sims, take - 1, axis=1)[:, :take]
            if take < len(doc_ids)
            else np.tile(np.arange(len(doc_ids)), (sims.shape[0], 1))
        )
        for row in range(sims.shape[0]):
            pairs = [(doc_ids[int(j)], float(sims[row, j])) for j in top[row]]
            run[qids[start + row]] = trec_order(pairs)[:k]
    return run


def run_file_candidates(path: str, corpus: dict[str, str], query_ids: Sequence[str], k: int) -> tuple[RankedRun, int]:
    """The top-k of a TREC run file for the evaluated queries. Documents missing from the corpus are dropped
    (they have no text to rerank or send); returns the run and how many were dropped."""
    given = read_trec_run(path)
    wanted = set(query_ids)
    if not wanted & set(given):
        raise InputError(f"run file {path} names none of the evaluated queries (ids like {sorted(wanted)[:3]})")
    dropped = 0
    run: RankedRun = {}
    for q in query_ids:
        kept = [(d, s) for d, s in given.get(q, []) if d in corpus]
        dropped += len(given.get(q, [])) - len(kept)
        run[q] = kept[:k]
    if dropped:
        log.warning("run file %s: %d results name documents missing from the corpus; dropped", path, dropped)
    return run, dropped


def retrieve(corpus: dict[str, str], queries: dict[str, str], k: int = 100, kind: str = "bm25", **kwargs) -> RankedRun:
    """Convenience for the demo and notebooks: ``retrieve(c.corpus, c.queries, 100)`` is BM25 top-100."""
    if kind == "bm25":
        return bm25_retrieve(corpus, queries, k, kwargs.get("config"))
    if kind == "dense":
        return dense_retrieve(corpus, queries, k, kwargs["model"])
    raise ValueError(f"unknown first stage {kind!r}; use bm25 or dense")
