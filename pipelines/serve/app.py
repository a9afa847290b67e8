"""The Ray Serve application: one deployment, a FastAPI ingress speaking every API, dynamic batching.

Each replica loads one ``Scorer`` (the batch job's scoring code, with ``activation: none`` so the raw score is
the batch job's number) before Serve routes anything to it. A request is validated, split into chunks of at most
``serve.max_batch_pairs`` pairs, and the chunks of all waiting requests are scored together, up to
``serve.max_batch_pairs`` pairs per model call, so many small requests share a call and one large request spreads
over several. A call is formed when the model is free (``RerankService._run_batches``), so every request that
arrived during a call joins the next one; Serve's ``@serve.batch`` forms its next batch while the previous one
still runs, from the requests of a ``batch_wait_timeout_s`` window, which left calls of a request or two under load.
One model call is one ``Scorer`` call, as in the batch job: the Scorer sorts the call's pairs by length and runs
them in forward passes of up to ``model.max_batch_tokens`` padded tokens, so pairs of different requests share
padded micro-batches of similar length. A request is checked whole before it joins a call; if the model still
raises on a call, its requests are scored again in halves, so only the request it fails on gets a 500 (every
error in the documented body of ``pipelines.serve.api.ApiError``). A request any of whose pairs the model scores
NaN or infinite gets a 500 ``score_not_finite`` naming the model and how many pairs, in every API
(``pipelines.serve.api.non_finite_problem``), never a 200 with a null score.

Overload is refused, never queued without bound: the proxy answers 503 + Retry-After past
``serve.max_queued_requests`` waiting requests, and a replica answers the same past ``serve.max_queued_pairs``
admitted but unscored pairs.

Several rerankers (``rerankers:``) are one application of several deployments (``build_app_from_config``): each
model its own ``ModelDeployment`` (the same replica core, ``_ModelReplica``: batching, overload, health check,
metrics; its own replicas and resources), and one ingress, ``RerankRouter``, holding the HTTP routes and the
models' deployment handles. The request's ``model`` field picks an entry; a cascade is one handle call per stage,
each stage over the top ``keep`` of the one before, the indices mapped back to the request's documents.
"""

# No `from __future__ import annotations` here: FastAPI must see the route signatures' real types on the class
# Serve serialises, or it takes the request models for query parameters.
import asyncio
import copy
import hmac
import logging
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.config import ServeAppConfig
from pipelines.serve.api import (
    ApiError,
    CohereRerankRequest,
    NIMRankingRequest,
    TEIRerankRequest,
    best_first,
    check_texts,
    cohere_response,
    cosine_to_unit,
    http_error,
    nim_response,
    non_finite_problem,
    tei_response,
    validation_error,
)

log = logging.getLogger("ray.serve")

# Endpoint -> the `api` tag of the metrics.
_APIS = {
    "/v1/rerank": "cohere_v1",
    "/v2/rerank": "cohere_v2",
    "/rerank": "tei",
    "/v1/ranking": "nim",
    "/health": "health",
    "/v1/models": "models",
}
_LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = validation_error(list(exc.errors()))
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (a body it cannot parse: invalid UTF-8, JSON nested too deeply; unknown path or
    method) in the documented body instead of ``{"detail": ...}``."""
    err = http_error(exc.status_code, exc.detail, exc.__cause__)
    return JSONResponse(err.body(), status_code=err.status, headers=dict(exc.headers or {}))


def _internal_error(request: Request, err: BaseException) -> JSONResponse:
    """An unexpected error in a route: 500 in the documented body (Starlette's default is plain text)."""
    log.error("%s %s failed: %r", request.method, request.url.path, err, exc_info=err)
    body = ApiError(
        500, f"internal error ({type(err).__name__}); the replica's log has the details", error_type="internal"
    ).body()
    return JSONResponse(body, status_code=500)


async def _auth_and_metrics(request: Request, call_next):
    start = time.perf_counter()
    state = request.app.state
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    api = _APIS.get(path.rstrip("/") or "/", "other")
    # The key is looked up in this process's environment on each request, never kept on the app: the FastAPI app
    # is pickled with the deployment class (by value), so anything on app.state could travel through Ray.
    key_env = getattr(state, "api_key_env", None)
    key = os.environ.get(key_env) if key_env else None
    if key and api != "health" and not _authorized(request.headers.get("authorization"), key):
        response = JSONResponse(
            ApiError(
                401, "missing or wrong API key (send Authorization: Bearer <key>)", error_type="unauthorized"
            ).body(),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    else:
        try:
            response = await call_next(request)
        except Exception as err:  # noqa: BLE001 - anything a route raised: answered, never a bare 500
            response = _internal_error(request, err)
    metrics = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.requests.inc(tags={"api": api, "status": str(response.status_code)})
        metrics.latency.observe((time.perf_counter() - start) * 1000.0, tags={"api": api})
    return response


def _authorized(header: str | None, key: str) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _make_app() -> FastAPI:
    """A FastAPI app with the service's error bodies, API key check and request metrics: one for the one-model
    deployment (``RerankService``), one for the ingress of several (``RerankRouter``)."""
    out = FastAPI(
        title="rerank",
        description="Reranking with Cohere/Jina (/v1/rerank, /v2/rerank), Hugging Face TEI (/rerank) and "
        "NVIDIA NIM (/v1/ranking) request shapes.",
    )
    out.add_exception_handler(ApiError, _api_error)
    out.add_exception_handler(RequestValidationError, _validation_error)
    out.add_exception_handler(StarletteHTTPException, _http_error)
    out.middleware("http")(_auth_and_metrics)
    return out


app = _make_app()  # RerankService's (model:)
router_app = _make_app()  # RerankRouter's (rerankers:)


@dataclass
class _Metrics:
    """Exported through Ray's metrics agent to Prometheus (names get a ``ray_`` prefix there)."""

    requests: Any
    latency: Any
    batch_pairs: Any
    batch_requests: Any
    pairs: Any

    @classmethod
    def create(cls) -> "_Metrics":
        from ray.serve import metrics

        return cls(
            requests=metrics.Counter(
                "rerank_requests",
                description="HTTP requests answered by a replica, by api and status code.",
                tag_keys=("api", "status"),
            ),
            latency=metrics.Histogram(
                "rerank_request_latency_ms",
                description="Time from a replica receiving a request to its response.",
                boundaries=_LATENCY_BOUNDARIES_MS,
                tag_keys=("api",),
            ),
            batch_pairs=metrics.Histogram(
                "rerank_batch_pairs",
                description="(query, document) pairs per model call.",
                boundaries=_BATCH_BOUNDARIES,
            ),
            batch_requests=metrics.Histogram(
                "rerank_batch_requests",
                description="Distinct requests sharing one model call.",
                boundaries=_BATCH_BOUNDARIES,
            ),
            pairs=metrics.Counter("rerank_pairs_scored", description="(query, document) pairs scored."),
        )


@dataclass
class _Chunk:
    """Up to one model call of one request's documents: the unit the replica's batcher gathers."""

    request_id: int
    query: str
    texts: list[str]
    tokens: int = 0  # estimated padded tokens: len(texts) x the longest pair
    limits: tuple[int, int] = (1, 1)  # (max pairs, max padded tokens) per model call


def _pairs_in(chunks: list[_Chunk]) -> int:
    return sum(len(c.texts) for c in chunks)


def _batch_cost(chunks: list[_Chunk]) -> int:
    """The size of a model call, against max_pairs x max_tokens: within it exactly when both the pairs and the
    padded tokens are within their limits (the replica's batcher counts the same, incrementally)."""
    max_pairs, max_tokens = chunks[0].limits
    return max(_pairs_in(chunks) * max_tokens, sum(c.tokens for c in chunks) * max_pairs)


def _estimate_tokens(query: str, text: str, max_length: int) -> int:
    """Tokens of a pair without tokenising: ~4 characters a token for English word pieces, plus special tokens."""
    return min(max_length, 3 + (len(query) + len(text)) // 4)


def _split(
    query: str, texts: list[str], max_pairs: int, max_tokens: int, max_length: int
) -> list[tuple[int, int, int]]:
    """(start, end, padded tokens) chunks of texts in input order, each within max_pairs and max_tokens."""
    out, start, longest = [], 0, 0
    for i, text in enumerate(texts):
        n = _estimate_tokens(query, text, max_length)
        if i > start and (i - start >= max_pairs or (i - start + 1) * max(longest, n) > max_tokens):
            out.append((start, i, min(max_tokens, (i - start) * longest)))
            start, longest = i, 0
        longest = max(longest, n)
    if texts:
        out.append((start, len(texts), min(max_tokens, (len(texts) - start) * longest)))
    return out


def _retry_after(seconds: int) -> dict[str, str]:
    return {"Retry-After": str(seconds)}


# Defined before the deployment: Serve serialises the class when it is decorated, with the globals it sees.
def model_display_name(config: ServeAppConfig) -> str:
    if config.serve.model_name:
        return config.serve.model_name
    return config.model.name_or_path.rstrip("/").rsplit("/", 1)[-1] or config.model.name_or_path


def resolve_api_key(config: ServeAppConfig) -> str | None:
    """The key as this process sees it (the driver's view: config, then environment). Replicas never get it from
    the driver: each reads its own environment (``replica_api_key``)."""
    return config.serve.api_key or os.environ.get(config.serve.api_key_env) or None


def replica_api_key(config: ServeAppConfig) -> str | None:
    """The key a replica enforces: the variable named by serve.api_key_env in the replica's own environment, set
    by the cluster from its secret store (or inherited from `rerank serve`'s environment on a local Ray). Read
    where it is used; never stored on the app or the deployment."""
    return os.environ.get(config.serve.api_key_env) or None


# One short pair: the health check's model probe.
_PROBE_QUERY = "health check"
_PROBE_TEXT = "a short passage to check that the model still scores"


class _ModelReplica:
    """One replica's model, its batch queue, its health check and counters: the part every model deployment
    shares (``RerankService`` adds the HTTP routes, ``ModelDeployment`` the handle calls of ``RerankRouter``)."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from pipelines.model.scoring import Scorer, default_threads

        self.config = ServeAppConfig.model_validate(config)
        s = self.config.serve
        model_config = self.config.model.model_copy(update={"activation": "none"})
        if model_config.num_threads is None:
            # Ray gives replicas with num_cpus <= 1 OMP_NUM_THREADS=1; use what the replica reserved.
            model_config = model_config.model_copy(update={"num_threads": default_threads(s.num_cpus_per_replica)})
        torch.set_num_threads(model_config.num_threads)
        self.scorer = Scorer(model_config)
        self.kind = model_config.kind
        self.model_name = model_display_name(self.config)
        # One thread runs the model; length checks get their own tokenizer copy (a fast tokenizer is not safe to
        # share between threads) and thread, so they never wait behind a model call.
        self._model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-model")
        self._check_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-check")
        self._check_tokenizer = copy.deepcopy(self.scorer.tokenizer)
        self._pending_pairs = 0
        self._next_request_id = 0
        self._stats = {"requests": 0, "batches": 0, "pairs": 0, "max_batch_pairs": 0, "max_batch_requests": 0}
        # A model call is one Scorer call of up to max_batch_pairs pairs: the Scorer sorts them by length and cuts
        # them into forward passes within model.max_batch_tokens. The call's token limit is what max_batch_pairs
        # pairs of max_length tokens hold, so only the pair count bounds a call.
        self._call_limits = (s.max_batch_pairs, s.max_batch_pairs * self.scorer.max_length)
        # Chunks waiting for the model, in arrival order, and the task that feeds them to it (_run_batches).
        self._waiting: deque[tuple[_Chunk, asyncio.Future]] = deque()
        self._waiting_pairs = 0
        self._batcher: asyncio.Task | None = None
        self._call_full: asyncio.Future | None = None  # set once a call's worth of pairs waits
        self._busy_since: float | None = None  # start of the model call in progress
        self._last_ok = time.monotonic()  # end of the last model call that succeeded
        self._model_failed = False  # a model call raised since the last good health check
        self._unhealthy: str | None = None  # why the last health check failed
        self._metrics = _Metrics.create()
        log.info(
            "rerank replica ready: model %s (%s, %s, %s %s, %d threads), model calls of up to %d pairs, forward "
            "passes of up to %d padded tokens",
            self.model_name,
            self.kind,
            self.scorer.info.device,
            self.scorer.config.backend,
            self.scorer.config.dtype,
            model_config.num_threads,
            self._call_limits[0],
            self.scorer.max_batch_tokens,
        )

    # ------------------------------------------------------------------ handle-only

    def stats(self) -> dict[str, int]:
        """Counters of this replica (through a DeploymentHandle): requests, batches, pairs, largest batch; also
        its process id and whether it enforces an API key."""
        return dict(
            self._stats,
            pending_pairs=self._pending_pairs,
            pid=os.getpid(),
            auth=int(bool(replica_api_key(self.config))),
        )

    async def check_health(self) -> None:
        """Called by Serve every serve.health_check_period_s; raising marks this replica unhealthy and Serve
        replaces it. Healthy: a model call succeeded within the last period, or a one-pair probe of the model
        passes (finite scores). A model call running longer than serve.request_timeout_s counts as hung."""
        s = self.config.serve
        now = time.monotonic()
        if self._busy_since is not None:
            if now - self._busy_since > s.request_timeout_s:
                self._unhealthy = f"a model call has been running for {now - self._busy_since:.0f} s"
                raise RuntimeError(self._unhealthy)
            return
        if not self._model_failed and now - self._last_ok < s.health_check_period_s:
            self._unhealthy = None
            return
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self._model_pool, self._model_outputs, [_PROBE_QUERY], [_PROBE_TEXT])
            if not np.all(np.isfinite(out)):
                raise ValueError(f"the model returned {out.ravel().tolist()} for a probe pair")
        except Exception as err:  # noqa: BLE001 - whatever broke the model makes this replica unhealthy
            self._unhealthy = f"model probe failed: {type(err).__name__}: {err}"
            raise RuntimeError(self._unhealthy) from None
        self._unhealthy = None
        self._model_failed = False
        self._last_ok = time.monotonic()

    # ------------------------------------------------------------------ internals

    def _check(self, query: str, texts: list[str], **fields: str) -> None:
        s = self.config.serve
        check_texts(query, texts, max_documents=s.max_documents, max_text_chars=s.max_text_chars, **fields)

    async def _check_lengths(
        self,
        query: str,
        texts: list[str],
        query_field: str,
        field: str,
        suffix: str,
        hint: str,
        indices: list[int] | None = None,
    ) -> None:
        """For APIs whose default is to refuse, not cut, inputs longer than the model's max length. indices: each
        text's index in the request (a cascade stage scores a subset), for the field named."""
        loop = asyncio.get_running_loop()
        bad = await loop.run_in_executor(self._check_pool, self._first_too_long, query, texts)
        if bad is None:
            return
        where, n, limit = bad
        if self.kind == "bi-encoder":
            what = f"{'the query' if where < 0 else 'the document'} is {n} tokens"
        elif where < 0:
            what = f"the query would be cut: with a document it is {n} tokens"
        else:
            what = f"the query and this document are {n} tokens together"
        raise ApiError(
            413,
            f"{what}, more than the model's limit of {limit}; {hint}",
            field=query_field if where < 0 else f"{field}[{where if indices is None else indices[where]}]{suffix}",
            error_type="payload_too_large",
        )

    def _first_too_long(self, query: str, texts: list[str]) -> tuple[int, int, int] | None:
        """(index, tokens, limit) of the first input the model would cut (index -1: the query), else None. Pair
        models follow the Scorer's own rule (`Scorer.first_cut`): a pair that fits in max_length is never cut."""
        tok = self._check_tokenizer
        if self.kind != "bi-encoder":
            return self.scorer.first_cut(query, texts, tokenizer=tok)
        cfg = self.scorer.config
        q_len = len(tok(cfg.query_template.format(query=query), add_special_tokens=False)["input_ids"])
        if q_len > self.scorer.max_query_length:
            return -1, q_len, self.scorer.max_query_length
        passages = [cfg.passage_template.format(text=t) for t in texts]
        lengths = [len(x) for x in tok(passages, add_special_tokens=False)["input_ids"]]
        limit = self.scorer.max_length - tok.num_special_tokens_to_add(pair=False)
        for i, n in enumerate(lengths):
            if n > limit:
                return i, n, limit
        return None

    async def _score(
        self, query: str, texts: list[str], indices: list[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(raw, [0, 1]) scores of (query, text) pairs in input order, scored in batches shared with other
        requests: the raw score is the batch job's with activation none, the [0, 1] one its activation sigmoid.
        indices: each text's index in the request, for the messages (a cascade stage scores a subset)."""
        s = self.config.serve
        n = len(texts)
        if self._pending_pairs and self._pending_pairs + n > s.max_queued_pairs:
            raise ApiError(
                503,
                f"overloaded: {self._pending_pairs} pairs waiting in this replica (serve.max_queued_pairs="
                f"{s.max_queued_pairs}); retry later",
                error_type="overloaded",
                headers=_retry_after(s.retry_after_s),
            )
        self._pending_pairs += n
        self._next_request_id += 1
        self._stats["requests"] += 1
        request_id = self._next_request_id
        try:
            limits = self._call_limits
            chunks = _split(query, texts, *limits, self.scorer.max_length)
            parts = await asyncio.gather(
                *(self._score_chunks(_Chunk(request_id, query, texts[a:b], t, limits)) for a, b, t in chunks)
            )
        finally:
            self._pending_pairs -= n
        failed = next((p for p in parts if isinstance(p, BaseException)), None)
        if failed is not None:  # the model raised on this request alone (logged by _score_isolated)
            raise ApiError(
                500,
                f"the model failed on this request ({type(failed).__name__}); the replica's log has the details",
                error_type="internal",
            )
        out = np.concatenate(parts)
        if self.kind == "bi-encoder":
            raw, unit = out[:, 0], cosine_to_unit(out[:, 0])
        else:
            raw, unit = self.scorer.from_logits(out, "none"), self.scorer.from_logits(out, "sigmoid")
        if problem := non_finite_problem(self.model_name, raw, unit, indices):
            # The rule of every API: never a 200 with a null (or a NaN JSON cannot carry) where a number is
            # promised. Logged once here; the next health check probes the model (a model that gives NaN for
            # everything is then marked unhealthy).
            self._model_failed = True
            log.error("request %d: %s", request_id, problem)
            raise ApiError(500, problem, error_type="score_not_finite")
        return raw, unit

    def _model_outputs(self, queries: list[str], passages: list[str]) -> np.ndarray:
        if self.kind == "bi-encoder":
            return self.scorer.score(queries, passages)[:, None]
        return self.scorer.logits(queries, passages)

    async def _score_chunks(self, chunk: _Chunk) -> np.ndarray | Exception:
        """One chunk's scores, or the error the model raised on its request alone (never raised here, so one
        request's failure never fails the other requests of its call). The chunk joins the next model call."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((chunk, future))
        self._waiting_pairs += len(chunk.texts)
        if self._call_full is not None and not self._call_full.done() and self._waiting_pairs >= self._call_limits[0]:
            self._call_full.set_result(None)
        if self._batcher is None or self._batcher.done():
            self._batcher = loop.create_task(self._run_batches())
        return await future

    async def _run_batches(self) -> None:
        """Feed the model while chunks wait: each call takes the waiting chunks in arrival order up to
        serve.max_batch_pairs pairs, formed when the model is free (so the chunks that arrived during a call all
        join the next one, up to the limit). A call that would be short of the limit first waits up to
        serve.batch_wait_timeout_s for more requests (cut short once the limit is reached)."""
        loop = asyncio.get_running_loop()
        max_pairs, max_tokens = self._call_limits
        wait_s = self.config.serve.batch_wait_timeout_s
        while self._waiting:
            if wait_s > 0 and self._waiting_pairs < max_pairs:
                self._call_full = loop.create_future()
                try:
                    await asyncio.wait([self._call_full], timeout=wait_s)
                finally:
                    self._call_full = None
            chunks: list[_Chunk] = []
            futures: list[asyncio.Future] = []
            pairs = tokens = 0  # as _batch_cost counts them
            while self._waiting:
                chunk, future = self._waiting[0]
                n, t = pairs + len(chunk.texts), tokens + chunk.tokens
                if chunks and max(n * max_tokens, t * max_pairs) > max_pairs * max_tokens:
                    break
                self._waiting.popleft()
                self._waiting_pairs -= len(chunk.texts)
                if not future.done():  # a request that went away (client disconnected) is not scored
                    chunks.append(chunk)
                    futures.append(future)
                    pairs, tokens = n, t
            if not chunks:
                continue
            try:
                results: list[Any] = await self._score_isolated(chunks)
            except Exception as err:  # noqa: BLE001 - not expected (_score_isolated returns errors): each caller gets it
                results = [err] * len(chunks)
            except BaseException:  # cancelled (the replica is stopping): so are the callers
                for future in futures:
                    future.cancel()
                raise
            for future, result in zip(futures, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _score_isolated(self, chunks: list[_Chunk]) -> list[np.ndarray | Exception]:
        """One model call for all chunks; if it raises, their requests are scored again in two halves (and so on),
        so a request the model fails on gets its own error and every other request its own scores, in a few
        more calls (about 2 log2 of the requests in the batch for one bad request)."""
        try:
            scores = await self._model_call(chunks)
        except Exception as err:  # noqa: BLE001 - handed to the request(s) it belongs to
            ids = list(dict.fromkeys(c.request_id for c in chunks))
            if len(ids) == 1:
                log.error("the model failed on request %d (%d pairs): %r", ids[0], _pairs_in(chunks), err)
                return [err] * len(chunks)
            first = set(ids[: len(ids) // 2])
            halves = [[i for i, c in enumerate(chunks) if (c.request_id in first) == side] for side in (True, False)]
            results: list[np.ndarray | Exception] = [err] * len(chunks)
            for half in halves:
                for i, result in zip(half, await self._score_isolated([chunks[i] for i in half]), strict=True):
                    results[i] = result
            return results
        ends = np.cumsum([len(c.texts) for c in chunks])
        return [scores[end - len(c.texts) : end] for c, end in zip(chunks, ends, strict=True)]

    async def _model_call(self, chunks: list[_Chunk]) -> np.ndarray:
        """The model's outputs for all pairs of the chunks, in order, in one call on the model thread."""
        queries = [c.query for c in chunks for _ in c.texts]
        passages = [t for c in chunks for t in c.texts]
        loop = asyncio.get_running_loop()
        # Cross-encoders hand back their logits, so each API can take the raw score or the probability.
        self._busy_since = time.monotonic()
        try:
            scores = await loop.run_in_executor(self._model_pool, self._model_outputs, queries, passages)
        except Exception:
            self._model_failed = True  # the next health check probes the model
            raise
        finally:
            self._busy_since = None
        self._last_ok = time.monotonic()
        n_requests = len({c.request_id for c in chunks})
        st = self._stats
        st["batches"] += 1
        st["pairs"] += len(passages)
        st["max_batch_pairs"] = max(st["max_batch_pairs"], len(passages))
        st["max_batch_requests"] = max(st["max_batch_requests"], n_requests)
        m = self._metrics
        m.batch_pairs.observe(len(passages))
        m.batch_requests.observe(n_requests)
        m.pairs.inc(len(passages))
        return scores


@serve.deployment(name="Reranker")
@serve.ingress(app)
class RerankService(_ModelReplica):
    """One replica of the one-model application (``model:``): the model, its batch queue and the HTTP routes."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        # The key is read from this replica's environment by the auth middleware: it never travels through Ray
        # (constructor arguments, runtime_env, the Serve config and the pickled app are all stored by Ray).
        app.state.api_key_env = self.config.serve.api_key_env  # the variable's name only
        app.state.metrics = self._metrics

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health(self) -> Any:
        """200 once the model is loaded (Serve routes nothing to a replica before its constructor finished), 503
        while this replica's last health check failed. With no replica at all, the proxy answers 503
        (``pipelines.serve.proxy``)."""
        if self._unhealthy:
            body = {"status": "unhealthy", "model": self.model_name, "message": self._unhealthy}
            return JSONResponse(body, status_code=503, headers=_retry_after(self.config.serve.retry_after_s))
        info = self.scorer.info  # the backend and precision in use; backend_choice: what auto chose and why
        return {
            "status": "ok",
            "model": self.model_name,
            "backend": info.backend,
            "dtype": info.dtype,
            "backend_choice": info.backend_choice,
        }

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        info = self.scorer.info
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "rerank",
                    "kind": info.kind,
                    "revision": info.revision,
                    "max_length": self.scorer.max_length,
                    "max_documents": self.config.serve.max_documents,
                }
            ],
        }

    @app.post("/v1/rerank")
    async def cohere_v1(self, body: CohereRerankRequest) -> dict[str, Any]:
        return await self._cohere(body, api_version="1")

    @app.post("/v2/rerank")
    async def cohere_v2(self, body: CohereRerankRequest) -> dict[str, Any]:
        return await self._cohere(body, api_version="2")

    @app.post("/rerank")
    async def tei(self, body: TEIRerankRequest) -> list[dict[str, Any]]:
        self._check(body.query, body.texts, query_field="query", texts_field="texts")
        if not body.truncate:
            await self._check_lengths(body.query, body.texts, "query", "texts", "", "send truncate: true to cut it")
        raw, unit = await self._score(body.query, body.texts)
        return tei_response(raw, unit, body.texts, raw_scores=body.raw_scores, return_text=body.return_text)

    @app.post("/v1/ranking")
    async def nim(self, body: NIMRankingRequest) -> dict[str, Any]:
        texts = [p.text for p in body.passages]
        self._check(body.query.text, texts, query_field="query.text", texts_field="passages", item_suffix=".text")
        if body.truncate == "NONE":
            await self._check_lengths(
                body.query.text, texts, "query.text", "passages", ".text", 'send truncate: "END" to cut it'
            )
        raw, _ = await self._score(body.query.text, texts)
        return nim_response(raw)

    # ------------------------------------------------------------------ internals

    async def _cohere(self, body: CohereRerankRequest, api_version: str) -> dict[str, Any]:
        self._check(body.query, body.documents, query_field="query", texts_field="documents")
        raw, unit = await self._score(body.query, body.documents)
        return cohere_response(
            raw,
            unit,
            body.documents,
            top_n=body.top_n,
            return_documents=body.return_documents,
            api_version=api_version,
        )


@serve.deployment(name="RerankerModel")
class ModelDeployment(_ModelReplica):
    """One replica of one model of ``rerankers:``: no HTTP routes; ``RerankRouter`` calls it through a deployment
    handle. Its own replicas, resources, batching, queue limits and health check (the entry's serve settings)."""

    async def score(
        self, query: str, texts: list[str], refuse_long: dict[str, str] | None = None, indices: list[int] | None = None
    ) -> dict[str, Any]:
        """{"raw", "unit"} scores of the pairs in input order, or {"error": ...}: an ApiError's parts (returned,
        not raised: an exception crossing the handle arrives wrapped). refuse_long: the fields of a 413 for a pair
        the model would cut (TEI truncate false, NIM NONE), None to cut it. indices: each text's index in the
        request, for messages."""
        try:
            if refuse_long is not None:
                await self._check_lengths(query, texts, indices=indices, **refuse_long)
            raw, unit = await self._score(query, texts, indices)
        except ApiError as err:
            return {"error": _error_parts(err)}
        return {"raw": raw, "unit": unit}

    def info(self) -> dict[str, Any]:
        """What /v1/models and /health report of this model: its kind, revision, max length, backend; unhealthy
        says why the last health check failed (None: healthy)."""
        info = self.scorer.info
        return {
            "model_kind": info.kind,
            "revision": info.revision,
            "max_length": self.scorer.max_length,
            "backend": info.backend,
            "dtype": info.dtype,
            "unhealthy": self._unhealthy,
        }


def _error_parts(err: ApiError) -> dict[str, Any]:
    return {
        "status": err.status,
        "message": str(err.args[0]) if err.args else err.message,
        "field": err.field,
        "error_type": err.error_type,
        "headers": dict(err.headers),
    }


def _error_from_parts(parts: dict[str, Any]) -> ApiError:
    return ApiError(
        parts["status"],
        parts["message"],
        field=parts.get("field"),
        error_type=parts.get("error_type", "validation"),
        headers=parts.get("headers") or None,
    )


async def _result(response: Any) -> Any:
    return await response


def _refuse_long(query_field: str, field: str, suffix: str, hint: str) -> dict[str, str]:
    return {"query_field": query_field, "field": field, "suffix": suffix, "hint": hint}


def _reindex(results: list[dict[str, Any]], idx: np.ndarray) -> list[dict[str, Any]]:
    """Results built on the documents a cascade's last stage scored, their index mapped back to the request's."""
    for item in results:
        item["index"] = int(idx[item["index"]])
    return results


@dataclass
class _RouteMetrics:
    """Per model deployment, at the ingress (Prometheus names get a ``ray_`` prefix): calls and their latency."""

    requests: Any
    latency: Any

    @classmethod
    def create(cls) -> "_RouteMetrics":
        from ray.serve import metrics

        return cls(
            requests=metrics.Counter(
                "rerank_model_requests",
                description="Calls of each model deployment (a cascade stage is one), by model and status code.",
                tag_keys=("model", "status"),
            ),
            latency=metrics.Histogram(
                "rerank_model_latency_ms",
                description="Time from the ingress calling a model deployment to its scores.",
                boundaries=_LATENCY_BOUNDARIES_MS,
                tag_keys=("model",),
            ),
        )


@dataclass(frozen=True)
class _Stage:
    """One model call of a routed request: the model deployment's id and how many candidates go on (None: last)."""

    model: str
    keep: int | None
    name: str


# How long /health and /v1/models wait for a model deployment to answer.
_INFO_TIMEOUT_S = 3.0


@serve.deployment(name="RerankRouter")
@serve.ingress(router_app)
class RerankRouter:
    """The ingress of several rerankers (``rerankers:``): the HTTP routes of every API, the request's ``model``
    picking an entry; a model entry is one call of its deployment, a cascade one call per stage, each stage over
    the top ``keep`` of the one before (over all of the request's documents). No model here: it parses, checks,
    routes and builds the responses."""

    def __init__(self, config: dict[str, Any], handles: dict[str, Any]):
        self.config = ServeAppConfig.model_validate(config)
        self.handles = handles  # model deployment id -> DeploymentHandle
        self.settings = {name: s for name, (_, s) in self.config.served_models().items()}
        self.routes: dict[str, list[_Stage]] = {}
        self.entries = {spec.name: spec for spec in self.config.rerankers or []}
        for spec in self.config.rerankers or []:
            if spec.model is not None:
                self.routes[spec.name] = [_Stage(spec.name, None, spec.name)]
            else:
                self.routes[spec.name] = [
                    _Stage(st.reranker or f"{spec.name}.{st.name}", st.keep, st.name) for st in spec.cascade or []
                ]
        self._info: dict[str, dict[str, Any]] = {}  # model id -> its last info()
        router_app.state.api_key_env = self.config.serve.api_key_env  # the variable's name only
        router_app.state.metrics = _Metrics.create()
        self._route_metrics = _RouteMetrics.create()
        log.info("rerank ingress ready: %s", ", ".join(f"{n} ({len(st)} stage(s))" for n, st in self.routes.items()))

    # ------------------------------------------------------------------ routes

    @router_app.get("/health")
    async def health(self) -> Any:
        """200 when every model has a healthy replica answering; else 503 naming those that do not."""
        infos = await asyncio.gather(*(self._model_info(m) for m in self.handles))
        models = {
            m: ("ok" if i is not None and not i.get("unhealthy") else "unavailable")
            for m, i in zip(self.handles, infos)
        }
        down = [m for m, state in models.items() if state != "ok"]
        if down:
            err = ApiError(
                503,
                f"no healthy replica of {', '.join(down)} answered within {_INFO_TIMEOUT_S:g} s; retry later",
                error_type="unavailable",
            )
            body = {**err.body(), "status": "unavailable", "models": models}
            return JSONResponse(body, status_code=503, headers=_retry_after(self.config.serve.retry_after_s))
        return {"status": "ok", "models": models}

    @router_app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        infos = dict(zip(self.handles, await asyncio.gather(*(self._model_info(m) for m in self.handles))))
        s = self.config.serve
        data = []
        for spec in self.config.rerankers or []:
            item: dict[str, Any] = {"id": spec.name, "object": "model", "created": 0, "owned_by": "rerank"}
            if spec.model is not None:
                item.update(kind="model", **self._describe(spec.name, infos.get(spec.name)))
            else:
                item["kind"] = "cascade"
                item["stages"] = [
                    {
                        "name": st.name,
                        "model": st.model,
                        "keep": st.keep,
                        **self._describe(st.model, infos.get(st.model)),
                    }
                    for st in self.routes[spec.name]
                ]
            item["max_documents"] = s.max_documents
            data.append(item)
        return {"object": "list", "data": data}

    @router_app.post("/v1/rerank")
    async def cohere_v1(self, body: CohereRerankRequest) -> dict[str, Any]:
        return await self._cohere(body, api_version="1")

    @router_app.post("/v2/rerank")
    async def cohere_v2(self, body: CohereRerankRequest) -> dict[str, Any]:
        return await self._cohere(body, api_version="2")

    @router_app.post("/rerank")
    async def tei(self, body: TEIRerankRequest) -> list[dict[str, Any]]:
        stages = self._route(body.model)
        self._check(body.query, body.texts, query_field="query", texts_field="texts")
        long = None if body.truncate else _refuse_long("query", "texts", "", "send truncate: true to cut it")
        idx, raw, unit = await self._rank(stages, body.query, body.texts, long)
        out = tei_response(
            raw, unit, [body.texts[i] for i in idx], raw_scores=body.raw_scores, return_text=body.return_text
        )
        return _reindex(out, idx)

    @router_app.post("/v1/ranking")
    async def nim(self, body: NIMRankingRequest) -> dict[str, Any]:
        stages = self._route(body.model)
        texts = [p.text for p in body.passages]
        self._check(body.query.text, texts, query_field="query.text", texts_field="passages", item_suffix=".text")
        long = None
        if body.truncate == "NONE":
            long = _refuse_long("query.text", "passages", ".text", 'send truncate: "END" to cut it')
        idx, raw, _ = await self._rank(stages, body.query.text, texts, long)
        out = nim_response(raw)
        _reindex(out["rankings"], idx)
        return out

    # ------------------------------------------------------------------ handle-only

    def stats(self) -> dict[str, Any]:
        """This ingress replica's process id and whether it enforces an API key."""
        return {"pid": os.getpid(), "auth": int(bool(replica_api_key(self.config)))}

    # ------------------------------------------------------------------ internals

    async def _cohere(self, body: CohereRerankRequest, api_version: str) -> dict[str, Any]:
        stages = self._route(body.model)
        self._check(body.query, body.documents, query_field="query", texts_field="documents")
        idx, raw, unit = await self._rank(stages, body.query, body.documents, None)
        out = cohere_response(
            raw,
            unit,
            [body.documents[i] for i in idx],
            top_n=body.top_n,
            return_documents=body.return_documents,
            api_version=api_version,
        )
        _reindex(out["results"], idx)
        return out

    def _check(self, query: str, texts: list[str], **fields: str) -> None:
        s = self.config.serve
        check_texts(query, texts, max_documents=s.max_documents, max_text_chars=s.max_text_chars, **fields)

    def _route(self, name: str | None) -> list[_Stage]:
        """The stages of the entry a request's model field names: 404 for a name not served, 400 for none when
        there are several (and no serve.default_model)."""
        names = list(self.routes)
        if name is None:
            name = self.config.serve.default_model or (names[0] if len(names) == 1 else None)
            if name is None:
                raise ApiError(
                    400,
                    f"this service has several rerankers: name one in the request's model field ({', '.join(names)}; "
                    "GET /v1/models lists them)",
                    field="model",
                    error_type="model_required",
                )
        stages = self.routes.get(name)
        if stages is None:
            raise ApiError(
                404,
                f"no reranker named {name!r} is served here; use one of {', '.join(names)} (GET /v1/models lists them)",
                field="model",
                error_type="model_not_found",
            )
        return stages

    async def _rank(
        self, stages: list[_Stage], query: str, texts: list[str], refuse_long: dict[str, str] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices into texts, raw, [0, 1]) of the documents the last stage scored, in the order they were sent to
        it: stage 1 scores all, each stage passes its top keep (best first, ties in the order it got them) to the
        next. The scores are the last stage's."""
        idx = np.arange(len(texts))
        raw = unit = np.empty(0)
        for stage in stages:
            raw, unit = await self._call(stage.model, query, [texts[i] for i in idx], refuse_long, idx)
            if stage.keep is not None:
                order = best_first(raw, stage.keep)
                idx, raw, unit = idx[order], raw[order], unit[order]
        return idx, raw, unit

    async def _call(
        self, model: str, query: str, texts: list[str], refuse_long: dict[str, str] | None, idx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One model deployment's scores for these pairs, its refusals as the ApiError it returned; a lost replica,
        a full queue and a timeout as 503 / 503 / 408 naming the model."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        s = self.settings[model]
        indices = None if np.array_equal(idx, np.arange(len(idx))) else idx.tolist()
        start = time.perf_counter()
        status = 200
        response = self.handles[model].score.remote(query, texts, refuse_long, indices)
        try:
            out = await asyncio.wait_for(_result(response), timeout=s.request_timeout_s)
            if "error" in out:
                raise _error_from_parts(out["error"])
            return out["raw"], out["unit"]
        except ApiError as err:
            status = err.status
            raise
        except asyncio.TimeoutError:
            response.cancel()
            status = 408
            raise ApiError(
                408,
                f"model {model} did not score this request within {s.request_timeout_s:g} s (serve.request_timeout_s); "
                "retry later, or send fewer documents",
                error_type="timeout",
            ) from None
        except BackPressureError:
            status = 503
            raise ApiError(
                503,
                f"model {model} is overloaded (its serve.max_queued_requests requests wait); retry later",
                error_type="overloaded",
                headers=_retry_after(s.retry_after_s),
            ) from None
        except (RayActorError, ActorUnavailableError, DeploymentUnavailableError) as err:
            status = 503
            log.warning("model %s: replica lost mid-request: %s", model, type(err).__name__)
            raise ApiError(
                503,
                f"model {model}: the replica serving this request was lost; nothing was returned, so retrying is safe",
                error_type="unavailable",
                headers=_retry_after(s.retry_after_s),
            ) from None
        finally:
            m = self._route_metrics
            m.requests.inc(tags={"model": model, "status": str(status)})
            m.latency.observe((time.perf_counter() - start) * 1000.0, tags={"model": model})

    async def _model_info(self, model: str) -> dict[str, Any] | None:
        try:
            info = await asyncio.wait_for(_result(self.handles[model].info.remote()), timeout=_INFO_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - no replica answered (lost, starting): reported as unavailable
            return None
        self._info[model] = info
        return info

    def _describe(self, model: str, info: dict[str, Any] | None) -> dict[str, Any]:
        """A model's entry in /v1/models: from its replica, else (none answered) the last answer or its config."""
        info = info or self._info.get(model)
        if info is None:
            cfg = self.config.served_models()[model][0]
            return {"model_kind": cfg.kind, "revision": cfg.revision, "max_length": cfg.max_length}
        return {k: info[k] for k in ("model_kind", "revision", "max_length")}


# ---------------------------------------------------------------------------------------------- building


def replica_gpus(config: ServeAppConfig) -> float:
    """GPUs each replica reserves; auto: 1 when the cluster has or can add GPUs and model.device may use one (as
    the batch job's actors), so a `device: cpu` replica does not hold a GPU it never uses. "Can add" is read from
    the cluster's node types (`cluster_gpus`): on an autoscaling cluster whose GPU nodes start at zero the replicas
    still ask for a GPU, and that request is what makes the autoscaler add a GPU node."""
    gpus = config.serve.num_gpus_per_replica
    if gpus != "auto":
        return float(gpus)
    import ray

    if not ray.is_initialized() or config.model.device == "cpu":
        return 0.0
    from pipelines.engine.ray_runtime import cluster_gpus

    now, most = cluster_gpus()
    if most <= 0:
        return 0.0
    if now <= 0:
        log.info(
            "no GPU node is up, but the cluster's autoscaler can add %s: each replica asks for 1 GPU "
            "(serve.num_gpus_per_replica auto) and starts once a GPU node is up",
            "GPU nodes (no upper bound)" if math.isinf(most) else f"up to {most:g} GPUs",
        )
    return 1.0


_DRAIN_CHECK_S = 0.5


def deployment_options(config: ServeAppConfig) -> dict[str, Any]:
    """serve.* -> Ray Serve deployment options (replicas, resources, queue limits)."""
    s = config.serve
    opts: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": s.num_cpus_per_replica,
            "num_gpus": replica_gpus(config),
            **({"resources": dict(s.replica_resources)} if s.replica_resources else {}),
        },
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        # A replica being stopped (scale-down, redeploy, app deletion) finishes its requests first, up to the
        # grace period, checking every half second (Serve's default: 2 s, a slower stop for nothing).
        "graceful_shutdown_timeout_s": s.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": _DRAIN_CHECK_S,
    }
    if s.autoscaling is not None:
        a = s.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def build_app_from_config(config: ServeAppConfig):
    """A bound Serve application for this config (deploy it with serve.run or a Serve config file): with model:,
    one deployment that holds the model and the HTTP routes (``RerankService``); with rerankers:, one deployment
    per model (``ModelDeployment``, named ``Reranker-<id>``) composed behind one ingress (``RerankRouter``) that
    holds their deployment handles."""
    if config.rerankers is None:
        return RerankService.options(**deployment_options(config)).bind(*replica_init_args(config))
    handles = {
        name: ModelDeployment.options(name=f"{MODEL_DEPLOYMENT_PREFIX}{name}", **deployment_options(sub)).bind(
            *replica_init_args(sub)
        )
        for name, sub in model_configs(config).items()
    }
    return RerankRouter.options(**ingress_options(config)).bind(*replica_init_args(config), handles)


MODEL_DEPLOYMENT_PREFIX = "Reranker-"


def model_configs(config: ServeAppConfig) -> dict[str, ServeAppConfig]:
    """Each model deployment's own config, as one-model configs: {"": config} for model:, else the model ids of
    rerankers: (entries with a model, cascade stages with their own) -> that model under its serve settings."""
    if config.rerankers is None:
        return {"": config}
    return {
        name: ServeAppConfig(model=model, serve=settings, ray=config.ray)
        for name, (model, settings) in config.served_models().items()
    }


def ingress_options(config: ServeAppConfig) -> dict[str, Any]:
    """The ingress of rerankers:: light (it parses, checks and routes; no model), with room for every request
    the model deployments can hold at once, so each model's own queue limit decides its 503s."""
    s = config.serve
    capacity = 0
    for sub in model_configs(config).values():
        m = sub.serve
        replicas = m.autoscaling.max_replicas if m.autoscaling is not None else m.num_replicas
        capacity += (m.max_ongoing_requests + max(m.max_queued_requests, 0)) * replicas
    return {
        "ray_actor_options": {"num_cpus": s.ingress_num_cpus_per_replica},
        "num_replicas": s.ingress_num_replicas,
        "max_ongoing_requests": max(capacity, s.max_ongoing_requests),
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "graceful_shutdown_timeout_s": s.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": _DRAIN_CHECK_S,
    }


def replica_init_args(config: ServeAppConfig) -> tuple[dict[str, Any]]:
    """What each replica is constructed with (Ray stores it): the config as set, so it validates again unchanged,
    without serve.api_key. The key is read by each replica from its own environment."""
    return (config.model_dump(mode="json", exclude_unset=True, exclude={"serve": {"api_key"}}),)
