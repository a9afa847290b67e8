"""Non-finite scores are never ranked nor reported as null (issue 23, cases 4 and 5).

- The eval: a TREC run file with a ``nan``/``inf``/``-inf`` score is refused naming the file, the line and the
  query; a reranker (or dense first stage) that scores a pair NaN or infinite fails the evaluation naming the
  reranker and the query; ``trec_order`` is checked on 1,000 random 20-document queries with ties.
- The service: a request any of whose pairs the model scores NaN or infinite gets a 500 ``score_not_finite``
  naming the model and how many pairs, in all four APIs, never a 200 with ``null``; the other requests of its
  batch are not affected. The model is a tiny cross-encoder whose embedding of the word "supersonic" is NaN, so
  exactly the pairs with that word score NaN (the health probe's pair scores finitely).

No-Ray tests first; then one in-process Ray + Serve app for the rest of the module.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import logging
import math
import os
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from pipelines.config import ModelConfig, ServeAppConfig, validate_config
from pipelines.errors import InputError, RerankError
from pipelines.io import collections as loaders
from tests.ports import free_port
from tests.ray_cluster import start_local_ray

NAN_WORD = "supersonic"
QUERY = "what is the pressure on a wing"
DOCS = [
    "the boundary layer of a wing at mach number 2",
    "heat transfer in a shock wave",
    f"a {NAN_WORD} wing in a shock wave",  # scores NaN
    "pressure flow on the wing",
    "ray data model rank query passage",
]
NAN_INDEX = 2
CLEAN_DOCS = [d for i, d in enumerate(DOCS) if i != NAN_INDEX]
ERROR_KEYS = {"message", "error", "error_type"}
APIS = ["v1/rerank", "v2/rerank", "rerank", "v1/ranking"]


# ---------------------------------------------------------------------------------------------- the eval


def _trec_sorted(ranked: list[tuple[str, float]]) -> bool:
    """trec_eval's order: score descending, ties by doc id descending."""
    return all(a[1] > b[1] or (a[1] == b[1] and a[0] > b[0]) for a, b in itertools.pairwise(ranked))


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_a_run_file_with_a_non_finite_score_is_refused_naming_file_line_and_query(tmp_path, bad):
    lines = [f"q1 Q0 d{i} {i} {20 - i}.5 bm25" for i in range(1, 6)]
    lines += [f"q2 Q0 d{i} {i} {20 - i} bm25" for i in range(1, 6)]
    lines[7] = f"q2 Q0 d3 3 {bad} bm25"  # line 8
    run = tmp_path / "first.run"
    run.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        loaders.read_trec_run(run)
    message = str(err.value)
    assert "\n" not in message
    assert str(run) in message and "line 8" in message and "query q2" in message and "document d3" in message
    assert repr(bad) in message, message
    # Through the eval's first stage too (what `rerank eval` with first_stage.run reads).
    from pipelines.evaluation.first_stage import run_file_candidates

    with pytest.raises(InputError, match="line 8: query q2"):
        run_file_candidates(str(run), {f"d{i}": "text" for i in range(1, 6)}, ["q1", "q2"], 10)


def test_trec_order_refuses_a_non_finite_score():
    with pytest.raises(InputError, match="document b has the non-finite score nan"):
        loaders.trec_order([("a", 1.0), ("b", float("nan")), ("c", 0.5)])
    with pytest.raises(InputError, match="non-finite score -inf"):
        loaders.trec_order([("a", 1.0), ("b", float("-inf"))])


def test_trec_order_on_1000_random_queries_of_20_documents(tmp_path):
    """Scores drawn from a few values (many ties) and from floats; each query's 20 documents in a random order.
    trec_order gives score descending, ties by doc id descending, a permutation of its input; read_trec_run of
    the same results written in a shuffled order with misleading ranks gives the same lists."""
    rng = random.Random(23)
    run: dict[str, list[tuple[str, float]]] = {}
    for q in range(1000):
        pool = [0.0, 1.0, 2.5, -3.0, 7.25] if q % 2 else None
        docs = rng.sample(range(1, 200), 20)
        pairs = [(f"d{d}", rng.choice(pool) if pool else rng.uniform(-10, 10)) for d in docs]
        ranked = loaders.trec_order(pairs)
        assert sorted(ranked) == sorted(pairs)
        assert _trec_sorted(ranked), (q, ranked)
        run[f"q{q}"] = ranked
    lines = [f"{q} Q0 {d} {i} {s!r} t" for q, ranked in run.items() for i, (d, s) in enumerate(ranked, 1)]
    rng.shuffle(lines)
    path = tmp_path / "random.run"
    path.write_text("\n".join(lines) + "\n")
    assert loaders.read_trec_run(path) == run


def test_rerank_top_k_refuses_a_non_finite_reranker_score():
    from pipelines.evaluation.metrics import NonFiniteScoreError
    from pipelines.evaluation.sweep import rerank_top_k

    first = {"q7": ["a", "b", "c", "d"]}
    assert rerank_top_k(first, {"q7": {"a": 1.0, "b": 3.0, "c": 2.0}}, 3) == {"q7": ["b", "c", "a", "d"]}
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteScoreError) as err:
            rerank_top_k(first, {"q7": {"a": 1.0, "b": bad, "c": 2.0}}, 3, reranker="minilm")
        assert isinstance(err.value, RerankError) and "\n" not in str(err.value)
        assert "reranker minilm: query q7, document b" in str(err.value)
    # Below the top k a score is not used: nothing to refuse.
    assert rerank_top_k(first, {"q7": {"d": float("nan")}}, 3) == first


def test_a_dense_first_stage_with_nan_embeddings_is_refused_naming_model_and_query(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from pipelines.evaluation.first_stage import dense_retrieve
    from pipelines.evaluation.metrics import NonFiniteScoreError
    from tests.tiny_models import build_bi_encoder

    path = build_bi_encoder(tmp_path / "tiny-bi-nan")
    model = AutoModel.from_pretrained(path)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(NAN_WORD)] = (
            float("nan")
        )
    model.save_pretrained(path)
    config = ModelConfig(name_or_path=str(path), kind="bi-encoder", device="cpu", batch_size=8)
    corpus = {f"d{i}": d for i, d in enumerate(DOCS)}
    clean = dense_retrieve({d: t for d, t in corpus.items() if d != f"d{NAN_INDEX}"}, {"q1": QUERY}, 3, config)
    assert len(clean["q1"]) == 3 and all(math.isfinite(s) for _, s in clean["q1"])
    with pytest.raises(NonFiniteScoreError) as err:
        dense_retrieve(corpus, {"q1": QUERY, "q2": "heat"}, 3, config)
    assert "\n" not in str(err.value) and f"model {path}" in str(err.value) and "query q1" in str(err.value)


def test_a_reranker_that_scores_nan_fails_the_eval_naming_reranker_and_query(tmp_path, monkeypatch):
    """The batch job rejects a pair scored NaN (reason score_not_finite) and goes on; score_candidates, the eval's
    one call of the job, then refuses in one line naming the reranker, its model and the first query. The job
    itself is replaced by what it leaves: results, _rejects/ and a summary."""
    import pipelines.job
    from pipelines.config import EvalConfig, load_config
    from pipelines.evaluation.metrics import NonFiniteScoreError
    from pipelines.evaluation.sweep import score_candidates

    conf = Path(__file__).parent.parent / "conf" / "eval_cranfield.yaml"
    config = load_config(EvalConfig, conf, ["model.name_or_path=/models/tiny-nan"])
    coll = loaders.Collection(
        corpus={"d1": "one", "d2": "two", "d3": "three"}, queries={"10": "q ten", "9": "q nine"}, qrels={}
    )
    ranking = {"9": ["d1", "d2", "d3"], "10": ["d3", "d1"]}
    nan_pairs = [("10", "d1")]

    def fake_job(job):
        out = Path(job.output.uri)
        (out / "_rejects").mkdir(parents=True, exist_ok=True)
        kept = [(q, d) for q, docs in ranking.items() for d in docs if (q, d) not in nan_pairs]
        pq.write_table(
            pa.table({"query_id": [q for q, _ in kept], "doc_id": [d for _, d in kept], "score": [0.5] * len(kept)}),
            out / "part-0.parquet",
        )
        pq.write_table(
            pa.table(
                {
                    "query_id": [q for q, _ in nan_pairs],
                    "doc_id": [d for _, d in nan_pairs],
                    "reason": ["score_not_finite"] * len(nan_pairs),
                }
            ),
            out / "_rejects" / "part-0.parquet",
        )
        return SimpleNamespace(rejected_by_reason={"score_not_finite": len(nan_pairs)} if nan_pairs else {})

    monkeypatch.setattr(pipelines.job, "run_rerank", fake_job)
    with pytest.raises(NonFiniteScoreError) as err:
        score_candidates(config, coll, ranking, tmp_path / "work", tmp_path / "job", reranker="nanny")
    message = str(err.value)
    assert "\n" not in message and "reranker nanny (model /models/tiny-nan)" in message, message
    assert "1 candidate pairs NaN or infinite in 1 queries, first query 10 (document d1)" in message, message
    # A clean job: the scores come back.
    nan_pairs.clear()
    scores, _ = score_candidates(config, coll, ranking, tmp_path / "work", tmp_path / "job2", reranker="nanny")
    assert scores == {"9": {"d1": 0.5, "d2": 0.5, "d3": 0.5}, "10": {"d3": 0.5, "d1": 0.5}}


# ---------------------------------------------------------------------------------------------- the service, no Ray


def build_nan_cross_encoder(path: Path) -> Path:
    """The tiny cross-encoder with the word embedding of NAN_WORD set to NaN: a pair with that word scores NaN."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.tiny_models import build_cross_encoder

    build_cross_encoder(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    word = tok.convert_tokens_to_ids(NAN_WORD)
    assert word != tok.unk_token_id
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[word] = float("nan")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> str:
    return str(build_nan_cross_encoder(tmp_path_factory.mktemp("nan-models") / "tiny-nan"))


@pytest.fixture(scope="module")
def scorer(nan_model):
    from pipelines.model.scoring import Scorer

    return Scorer(ModelConfig(name_or_path=nan_model, device="cpu", batch_size=8, activation="none"))


def _config(model_path: str, **serve: Any) -> ServeAppConfig:
    return validate_config(
        ServeAppConfig,
        {
            "model": {"name_or_path": model_path, "device": "cpu", "batch_size": 8, "num_threads": 1},
            "serve": {"api_key_env": "RERANK_NONFINITE_TEST_UNSET_KEY", **serve},
        },
    )


def test_the_nan_model_scores_nan_for_its_word_only(scorer):
    raw = scorer.score([QUERY] * len(DOCS), DOCS)
    assert np.isnan(raw[NAN_INDEX]) and np.isfinite(np.delete(raw, NAN_INDEX)).all(), raw
    from pipelines.serve.app import _PROBE_QUERY, _PROBE_TEXT

    assert np.isfinite(scorer.score([_PROBE_QUERY], [_PROBE_TEXT])).all()  # the health probe passes


def test_non_finite_problem_message():
    from pipelines.serve.api import cosine_to_unit, non_finite_problem

    assert non_finite_problem("m", np.array([0.1, -2.0]), np.array([0.5, 0.1])) is None
    raw = np.array([0.3, np.nan, np.inf, -np.inf, 0.2])
    message = non_finite_problem("my-model", raw, cosine_to_unit(raw))  # a bi-encoder: clip makes inf 1.0
    assert message is not None and "\n" not in message
    assert message.startswith("model my-model returned a non-finite score for 3 of 5 pairs"), message
    assert "(1 NaN, 2 infinite; first at document index 1)" in message, message
    # A finite logit whose [0, 1] score is not (a two-label model with one NaN logit) counts too.
    assert "1 of 2 pairs" in non_finite_problem("m", np.array([1.0, 2.0]), np.array([0.7, np.nan]))


@pytest.mark.timeout(120)
def test_a_non_finite_request_fails_alone_and_is_logged_once(nan_model, scorer):
    """The replica class outside Serve: a request with a NaN pair, and one whose model outputs are made +inf,
    each get ApiError 500 score_not_finite naming the model and the count, logged once each; a clean request
    sharing the model gets its scores; the next health check probes the model and passes."""
    import asyncio

    from pipelines.serve.api import ApiError
    from pipelines.serve.app import RerankService

    ours = RerankService.func_or_class.__mro__[1]  # Serve's ingress wrapper (async __init__) around our class
    replica = object.__new__(ours)
    ours.__init__(replica, _config(nan_model).model_dump(mode="json", exclude_unset=True))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        with pytest.raises(ApiError) as err:
            asyncio.run(replica._score(QUERY, DOCS))
        assert err.value.status == 500 and err.value.error_type == "score_not_finite"
        body = err.value.body()
        assert set(body) == ERROR_KEYS and body["message"] == body["error"]
        assert body["message"].startswith("model tiny-nan returned a non-finite score for 1 of 5 pairs"), body
        assert "first at document index 2" in body["message"] and "\n" not in body["message"]
        nonfinite_logs = [r for r in records if "non-finite" in r.getMessage()]
        assert len(nonfinite_logs) == 1 and nonfinite_logs[0].levelno == logging.ERROR, records

        real = replica._model_outputs

        def infinite(queries, passages):
            out = real(queries, passages)
            out[[i for i, p in enumerate(passages) if "wing" in p]] = np.inf
            return out

        replica._model_outputs = infinite
        with pytest.raises(ApiError) as err:
            asyncio.run(replica._score(QUERY, CLEAN_DOCS))
        assert "2 of 4 pairs" in err.value.message and "2 infinite" in err.value.message, err.value.message
        replica._model_outputs = real
        assert len([r for r in records if "non-finite" in r.getMessage()]) == 2
    finally:
        logger.removeHandler(handler)
    raw, unit = asyncio.run(replica._score(QUERY, CLEAN_DOCS))
    assert np.allclose(raw, scorer.score([QUERY] * len(CLEAN_DOCS), CLEAN_DOCS), atol=1e-4)
    assert np.isfinite(unit).all()
    assert replica._model_failed  # set by the non-finite requests: the next health check probes the model
    asyncio.run(replica.check_health())
    assert not replica._model_failed and replica._unhealthy is None
    assert replica.stats()["pending_pairs"] == 0


# ---------------------------------------------------------------------------------------------- in-process Ray


@pytest.fixture(scope="module")
def service(nan_model):
    """One Ray and one Serve app with the NaN model for the rest of the module."""
    import ray
    from ray import serve

    from pipelines.serve import start_service

    port = free_port()
    config = _config(
        nan_model,
        port=port,
        app_name="rerank-nonfinite",
        num_cpus_per_replica=0.5,
        max_batch_pairs=64,
        batch_wait_timeout_s=0.1,  # concurrent requests share model calls
        max_ongoing_requests=32,
        max_queued_requests=64,
    )
    os.environ.pop("RERANK_NONFINITE_TEST_UNSET_KEY", None)
    start_local_ray()
    try:
        handle = start_service(config)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"{url}/health not 200 after 90 s"
            time.sleep(0.5)
        yield url, handle
    finally:
        serve.shutdown()
        ray.shutdown()


def _body(api: str, query: str, docs: list[str]) -> dict[str, Any]:
    if api in ("v1/rerank", "v2/rerank"):
        return {"model": "m", "query": query, "documents": docs, "top_n": 2}
    if api == "rerank":
        return {"query": query, "texts": docs}
    return {"model": "m", "query": {"text": query}, "passages": [{"text": d} for d in docs]}


def _reported(api: str, out: Any) -> list[Any]:
    if api == "rerank":
        return [x["score"] for x in out]
    if api == "v1/ranking":
        return [x["logit"] for x in out["rankings"]]
    return [x["relevance_score"] for x in out["results"]]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("api", APIS)
def test_every_api_answers_a_nan_score_with_a_500_naming_the_model(service, scorer, api):
    """4 requests with the NaN pair among 8 clean ones, all at once: the 4 get 500 score_not_finite naming the
    model and '1 of 5 pairs' (Cohere's top_n 2 included: the NaN pair need not be among those returned), the 8
    get 200 with numbers only, equal to the scorer's. Never a 200 with null."""
    url, handle = service
    words = ("flow", "heat", "shock", "mach", "wing", "layer")
    jobs = [(f"{QUERY} {words[i % 6]}", DOCS if i % 3 == 1 else CLEAN_DOCS) for i in range(12)]
    payloads = [json.dumps(_body(api, q, docs)).encode() for q, docs in jobs]
    barrier = threading.Barrier(len(jobs))

    def call(data: bytes) -> requests.Response:
        barrier.wait()
        return requests.post(f"{url}/{api}", data=data, headers={"Content-Type": "application/json"}, timeout=60)

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        responses = list(ex.map(call, payloads))
    for (q, docs), r in zip(jobs, responses, strict=True):
        out = r.json()
        if docs is DOCS:
            assert r.status_code == 500, (api, r.status_code, r.text[:300])
            assert set(out) == ERROR_KEYS and out["error_type"] == "score_not_finite", out
            assert out["message"] == out["error"] and "\n" not in out["message"]
            assert out["message"].startswith("model tiny-nan returned a non-finite score for 1 of 5 pairs"), out
        else:
            assert r.status_code == 200, (api, r.status_code, r.text[:300])
            got = _reported(api, out)
            assert got and all(isinstance(x, float) and math.isfinite(x) for x in got), out
            raw = scorer.score([q] * len(docs), docs)
            best = float(raw.max()) if api == "v1/ranking" else 1.0 / (1.0 + math.exp(-float(raw.max())))
            assert abs(got[0] - best) < 1e-4, (got, raw)
    stats = handle.stats.remote().result(timeout_s=30)
    assert stats["pending_pairs"] == 0
    handle.check_health.remote().result(timeout_s=60)  # probes the model (a request failed): still healthy
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
