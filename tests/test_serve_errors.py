"""One bad request never fails another, and every error has the documented body, on 127.0.0.1 with a tiny
cross-encoder: a lone surrogate among concurrent clean requests (only it gets 422, naming the field, on every
API), a request the model raises on scored apart from its batch, parse errors (invalid UTF-8, JSON nested
100,000 deep) and unknown paths in the documented body instead of FastAPI's ``{"detail": ...}``, and integer
fields that take JSON integers only (``top_n: true`` is a 422, not 1). `rerank serve` whose Ray or HTTP proxy
cannot start says so in one line (exit 2), not in Ray's traceback.

Bodies are sent as raw bytes: ``json.dumps`` (ensure_ascii) writes a lone surrogate as the escape ``\\ud800``,
which is what a real client sends and what reaches the server.

No-Ray tests first; then one in-process Ray + Serve app for the rest of the module (auth off, queue limits wide
enough for the floods).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from pipelines.config import ModelConfig, ServeAppConfig, validate_config
from tests.ports import free_port
from tests.ray_cluster import start_local_ray

QUERY = "what is the boundary layer of a supersonic wing"
DOCS = [
    "the boundary layer of a wing at supersonic mach number",
    "heat transfer in a shock wave",
    "pressure flow on the wing",
    "ray data model rank query passage",
    "the of and a to in is for \U0001f600",  # a surrogate pair in JSON (\ud83d\ude00): valid, scored
]
WORDS = ("flow", "heat", "shock", "mach", "wing", "layer", "pressure", "wave", "rank", "data")
CLEAN_QUERIES = [f"{QUERY} {WORDS[i % 10]} {WORDS[i // 10]}" for i in range(40)]
ERROR_KEYS = {"message", "error", "error_type"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from tests.tiny_models import build_cross_encoder

    return str(build_cross_encoder(tmp_path_factory.mktemp("error-models") / "tiny-ce"))


@pytest.fixture(scope="module")
def scorer(model_path):
    """The batch job's scorer in this process: each request's scores as if it had been scored alone."""
    from pipelines.model.scoring import Scorer

    return Scorer(ModelConfig(name_or_path=model_path, device="cpu", batch_size=8))


def _config(model_path: str, **serve: Any) -> ServeAppConfig:
    return validate_config(
        ServeAppConfig,
        {
            "model": {"name_or_path": model_path, "device": "cpu", "batch_size": 8, "num_threads": 1},
            "serve": {"api_key_env": "RERANK_ERRORS_TEST_UNSET_KEY", **serve},
        },
    )


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------- no Ray


def test_check_texts_refuses_what_utf8_cannot_encode():
    from pipelines.serve.api import ApiError, check_texts

    limits = {"max_documents": 10, "max_text_chars": 100}
    check_texts("q \U0001f600", ["a \U0001f600"], query_field="query", texts_field="documents", **limits)
    cases = [
        ("q\ud800", ["a"], "query", 1),
        ("q", ["a", "b", "c", "d \udc00"], "documents[3]", 2),
        ("q", ["a", "\udc00\ud800"], "documents[1]", 0),  # a pair in the wrong order is two lone surrogates
    ]
    for query, texts, field, at in cases:
        with pytest.raises(ApiError) as err:
            check_texts(query, texts, query_field="query", texts_field="documents", **limits)
        assert (err.value.status, err.value.field) == (422, field)
        assert f"character {at} is a lone surrogate" in err.value.message and "UTF-8" in err.value.message
        json.dumps(err.value.body(), ensure_ascii=False).encode()  # the body itself is valid UTF-8


def test_every_integer_field_of_the_request_schemas_is_strict():
    """Every field of the four APIs' request models that takes an integer takes a JSON integer only: pydantic's
    default would take true as 1, "3" as 3 and 3.0 as 3. Checked on the schemas, so a new field cannot miss it."""
    from pydantic import BaseModel, ValidationError

    from pipelines.serve import api

    def ints(annotation, strict: bool = False) -> list[bool]:
        """Whether each int inside an annotation (unions, Annotated, lists) is strict."""
        if annotation is int:
            return [strict]
        if typing.get_origin(annotation) is typing.Annotated:
            inner, *meta = typing.get_args(annotation)
            return ints(inner, strict or any(getattr(m, "strict", False) for m in meta))
        return [x for arg in typing.get_args(annotation) for x in ints(arg, strict)]

    models = [m for m in vars(api).values() if isinstance(m, type) and issubclass(m, BaseModel) and m is not BaseModel]
    int_fields = []
    for model in models:
        for name, field in model.model_fields.items():
            found = ints(field.annotation, any(getattr(m, "strict", False) for m in field.metadata))
            if found:
                int_fields.append((model.__name__, name))
                assert all(found), f"{model.__name__}.{name} takes an int in pydantic's lax mode"
    assert {("CohereRerankRequest", "top_n"), ("CohereRerankRequest", "max_tokens_per_doc")} <= set(int_fields)
    for model_name, name in int_fields:
        model = getattr(api, model_name)
        for bad in (True, False, "3", 3.0):
            with pytest.raises(ValidationError) as err:
                model.model_validate({"query": "q", "documents": ["a"], name: bad})
            errors = [dict(e, loc=("body", *e["loc"])) for e in err.value.errors()]
            refusal = api.validation_error(errors)
            assert (refusal.status, refusal.field, refusal.message) == (422, name, f"{name}: must be an integer")
        assert getattr(model.model_validate({"query": "q", "documents": ["a"], name: 3}), name) == 3


def test_an_http_proxy_that_cannot_start_is_one_line(monkeypatch, model_path):
    """serve.start failing (the port taken: Ray's task error, the proxy's remote traceback in its text) is a
    RerankError of one line naming the address and the cause."""
    from ray import serve

    from pipelines.errors import RerankError
    from pipelines.serve import start_service

    def taken(**_):
        raise RuntimeError(
            "\x1b[36mray::ProxyActor.ready()\x1b[39m (pid=2695, ip=127.0.0.1)\n"
            '  File "ray/serve/_private/proxy.py", line 1807, in ready\n'
            "    self._running_http_server_task, _ = await self._start_http_server_task\n"
            "RuntimeError: Failed to bind to address '127.0.0.1:8123'."
        )

    monkeypatch.setattr(serve, "start", taken)
    monkeypatch.setattr("pipelines.model.backends.check_model_on", lambda *a, **k: None)
    monkeypatch.setattr("pipelines.serve.app.replica_gpus", lambda config: 0.0)
    with pytest.raises(RerankError) as err:
        start_service(_config(model_path, port=8123))
    message = str(err.value)
    assert "\n" not in message and "127.0.0.1:8123" in message, message
    assert message.endswith("RuntimeError: Failed to bind to address '127.0.0.1:8123'."), message


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cause", ["ray_tmpdir_is_a_file", "cluster_address_closed"])
def test_rerank_serve_says_in_one_line_when_ray_cannot_start(model_path, tmp_path, cause):
    """`rerank serve` whose Ray fails to start: `rerank: error: ...` in one line and exit 2, no traceback (Ray's
    own log lines may come first), nothing left running."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    env.pop("RAY_ADDRESS", None)
    if cause == "ray_tmpdir_is_a_file":
        (tmp_path / "file").write_text("not a folder")
        env["RAY_TMPDIR"] = str(tmp_path / "file" / "ray")
    else:
        env["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"  # nothing listens there
    cmd = [
        sys.executable, "-m", "pipelines.cli", "serve", str(root / "conf/serve.yaml"),
        "--set", f"model.name_or_path={model_path}", "--set", "model.device=cpu", "--set", f"serve.port={free_port()}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("rerank: error: ")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    if cause == "ray_tmpdir_is_a_file":
        assert errors[0].startswith("rerank: error: Ray failed to start: NotADirectoryError: "), errors
        assert str(tmp_path / "file") in errors[0]
    else:
        assert "does not answer" in errors[0] and "RAY_ADDRESS" in errors[0], errors


@pytest.mark.timeout(120)
def test_a_request_the_model_fails_on_never_fails_its_batch(model_path, scorer):
    """The replica class outside Serve, the model made to raise on any pair containing one word. A batch of the
    chunks of 26 requests (what @serve.batch hands the replica), two of them failing: each clean request gets
    its own scores, each failing one its own error, in fewer model calls than one retry per request; a request
    that fails answers 500 in the documented body. (@serve.batch itself hands each caller the item returned for
    it; its queue needs a real replica, so the 40-request floods below run in Serve.)"""
    from pipelines.serve.api import ApiError
    from pipelines.serve.app import RerankService, _Chunk

    ours = RerankService.func_or_class.__mro__[1]  # Serve's ingress wrapper (async __init__) around our class
    replica = object.__new__(ours)
    ours.__init__(replica, _config(model_path).model_dump(mode="json", exclude_unset=True))
    real = replica._model_outputs
    calls: list[int] = []

    def poisoned(queries, passages):
        calls.append(len(passages))
        if any("poison" in p for p in passages):
            raise RuntimeError("the model cannot score poison")
        return real(queries, passages)

    replica._model_outputs = poisoned
    bad_docs = [DOCS[0], "a poison document"]
    limits = replica._call_limits
    chunks = [_Chunk(i, q, DOCS[:3], 0, limits) for i, q in enumerate(CLEAN_QUERIES[:24])]
    chunks.insert(3, _Chunk(100, QUERY, bad_docs, 0, limits))
    chunks.insert(17, _Chunk(101, QUERY, bad_docs, 0, limits))
    chunks.append(_Chunk(0, CLEAN_QUERIES[0], DOCS[3:], 0, limits))  # a second chunk of request 0
    results = asyncio.run(replica._score_isolated(chunks))
    assert len(results) == len(chunks)
    for chunk, out in zip(chunks, results, strict=True):
        if chunk.request_id >= 100:
            assert isinstance(out, RuntimeError) and "poison" in str(out)
        else:
            assert isinstance(out, np.ndarray), out
            expected = scorer.logits([chunk.query] * len(chunk.texts), chunk.texts)
            assert np.allclose(out, expected, atol=1e-4)
    assert len(calls) < 1 + 26, calls  # halving the batch, not one retry per request
    assert replica.stats()["max_batch_requests"] >= 3

    async def alone(chunk):  # a batch of one, through the same isolation
        (out,) = await replica._score_isolated([chunk])
        return out

    replica._score_chunks = alone
    with pytest.raises(ApiError) as err:
        asyncio.run(replica._score(QUERY, bad_docs))
    assert err.value.status == 500 and "RuntimeError" in err.value.message
    assert set(err.value.body()) == ERROR_KEYS and err.value.body()["error_type"] == "internal"
    raw, _unit = asyncio.run(replica._score(QUERY, DOCS))
    assert np.allclose(raw, scorer.score([QUERY] * len(DOCS), DOCS), atol=1e-4)
    assert replica.stats()["pending_pairs"] == 0


@pytest.mark.timeout(120)
def test_a_model_call_takes_every_request_that_arrived_during_the_last(model_path, scorer):
    """The replica's batcher outside Serve, the model made slow: 13 requests of 5 documents come in while the
    first call runs, and the next call takes all that fit in serve.max_batch_pairs (12), in arrival order, the
    one after it the rest, each request getting its own scores back; a large request is spread over calls within
    the limit. (@serve.batch formed its next batches while a call ran, from whatever came in a
    batch_wait_timeout_s window: calls of a request or two under load.)"""
    from pipelines.serve.app import RerankService

    ours = RerankService.func_or_class.__mro__[1]
    replica = object.__new__(ours)
    ours.__init__(replica, _config(model_path, max_batch_pairs=64).model_dump(mode="json", exclude_unset=True))
    real = replica._model_outputs
    calls: list[list[str]] = []

    def slow(queries, passages):
        calls.append(list(dict.fromkeys(queries)))
        time.sleep(0.3)
        return real(queries, passages)

    replica._model_outputs = slow
    queries = CLEAN_QUERIES[:13]

    async def flood():
        first = asyncio.ensure_future(replica._score(QUERY, DOCS))
        await asyncio.sleep(0.1)  # the first call is running
        rest = [asyncio.ensure_future(replica._score(q, DOCS)) for q in queries]
        return await first, await asyncio.gather(*rest)

    (raw, _), rest = asyncio.run(flood())
    assert calls == [[QUERY], queries[:12], queries[12:]], calls  # 12 x 5 pairs fit in 64; the 13th waits
    for q, (got, _) in zip([QUERY, *queries], [(raw, None), *rest], strict=True):
        assert np.allclose(got, scorer.score([q] * len(DOCS), DOCS), atol=1e-4)
    calls.clear()
    docs = [f"{DOCS[i % len(DOCS)]} {i}" for i in range(150)]
    raw, _ = asyncio.run(replica._score(QUERY, docs))
    assert np.allclose(raw, scorer.score([QUERY] * len(docs), docs), atol=1e-4)
    assert len(calls) == 3 and replica.stats()["max_batch_pairs"] <= 64
    assert replica.stats()["pending_pairs"] == 0 and replica._waiting_pairs == 0


# ---------------------------------------------------------------------------------------------- in-process Ray


@pytest.fixture(scope="module")
def service(model_path):
    """One Ray and one Serve app for the rest of the module: auth off, room for 44 concurrent requests."""
    import ray
    from ray import serve

    from pipelines.serve import start_service

    port = free_port()
    config = _config(
        model_path,
        port=port,
        app_name="rerank-errors",
        num_cpus_per_replica=0.5,
        max_batch_pairs=64,
        batch_wait_timeout_s=0.1,  # wide, so concurrent requests reliably share batches
        max_ongoing_requests=64,
        max_queued_requests=128,
    )
    os.environ.pop("RERANK_ERRORS_TEST_UNSET_KEY", None)
    start_local_ray()
    try:
        handle = start_service(config)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, timeout=90)
        yield url, handle
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/health not 200 after {timeout} s")


def _post_raw(url: str, path: str, data: bytes) -> requests.Response:
    return requests.post(f"{url}/{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60)


def _body(api: str, query: str, docs: list[str]) -> dict[str, Any]:
    if api in ("v1/rerank", "v2/rerank"):
        return {"model": "m", "query": query, "documents": [docs[0], {"text": docs[1]}, *docs[2:]]}
    if api == "rerank":
        return {"query": query, "texts": docs, "raw_scores": True}
    return {"model": "m", "query": {"text": query}, "passages": [{"text": d} for d in docs]}


def _scores(api: str, response: requests.Response) -> np.ndarray:
    """Each document's reported score in input order: Cohere's relevance_score (the sigmoid of the logit), TEI's
    raw score (raw_scores: true), NIM's logit."""
    out = response.json()
    if api == "rerank":
        items, key = out, "score"
    elif api == "v1/ranking":
        items, key = out["rankings"], "logit"
    else:
        items, key = out["results"], "relevance_score"
    got = np.full(len(DOCS), np.nan)
    for x in items:
        got[x["index"]] = x[key]
    return got


def _expected(api: str, raw: np.ndarray) -> np.ndarray:
    return _sigmoid(raw) if api in ("v1/rerank", "v2/rerank") else raw


def _query_field(api: str) -> str:
    return "query.text" if api == "v1/ranking" else "query"


def _doc_field(api: str, i: int) -> str:
    return {"rerank": f"texts[{i}]", "v1/ranking": f"passages[{i}].text"}.get(api, f"documents[{i}]")


APIS = ["v1/rerank", "v2/rerank", "rerank", "v1/ranking"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("api", APIS)
def test_lone_surrogate_among_concurrent_clean_requests(service, scorer, api):
    """40 clean requests and 4 with a lone surrogate, all at once: only the 4 get 422 naming the field, every
    clean one 200 with its own scores as if alone; the bad ones never reach the batches."""
    url, handle = service
    bad = [  # (query, documents, field)
        (QUERY + " \ud800", DOCS, _query_field(api)),
        (QUERY, [*DOCS[:3], "a lone \ud800 high surrogate", *DOCS[4:]], _doc_field(api, 3)),
        (QUERY, ["\udc00 a lone low surrogate", *DOCS[1:]], _doc_field(api, 0)),
        (QUERY, [DOCS[0], "reversed pair \ude00\ud83d", *DOCS[2:]], _doc_field(api, 1)),
    ]
    jobs = [(q, DOCS, None) for q in CLEAN_QUERIES[:20]] + bad + [(q, DOCS, None) for q in CLEAN_QUERIES[20:]]
    payloads = [json.dumps(_body(api, q, docs)).encode() for q, docs, _ in jobs]
    assert b"\\ud800" in payloads[20] and b"\\ud83d\\ude00" in payloads[0]  # escapes, as real clients send
    before = handle.stats.remote().result(timeout_s=30)
    barrier = threading.Barrier(len(jobs))

    def call(data: bytes) -> requests.Response:
        barrier.wait()
        return _post_raw(url, api, data)

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        responses = list(ex.map(call, payloads))
    after = handle.stats.remote().result(timeout_s=30)
    codes = [r.status_code for r in responses]
    assert codes == [200] * 20 + [422] * 4 + [200] * 20, codes
    for (q, docs, field), r in zip(jobs, responses, strict=True):
        if field is None:
            expected = _expected(api, scorer.score([q] * len(docs), docs))
            assert np.allclose(_scores(api, r), expected, atol=1e-4), (q, r.text)
        else:
            out = r.json()
            assert set(out) == ERROR_KEYS | {"field"} and out["error"] == out["message"], out
            assert out["field"] == field and out["message"].startswith(f"{field}: character "), out
            assert "lone surrogate" in out["message"] and out["error_type"] == "validation"
    assert after["requests"] - before["requests"] == 40  # the bad ones were refused before batching
    assert after["batches"] - before["batches"] < 40, (before, after)  # the clean ones shared batches
    assert after["pending_pairs"] == 0


DEEP = b'{"query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
PARSE_ERRORS = [  # (body, status, words the message must contain)
    (b'{"query": "q \xff", "documents": ["a"]}', 400, "not valid UTF-8"),
    (b"\xef\xbb\xbf\x80", 400, "not valid UTF-8"),
    (DEEP, 400, "nested too deeply"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("api", APIS)
def test_parse_errors_have_the_documented_body(service, api):
    url, _ = service
    # A surrogate encoded as if it were a character (CESU-8, b"\xed\xa0\x80"): Python's JSON reader takes it as the
    # lone surrogate itself (surrogatepass), so it is refused like the escape, naming the field.
    cesu = json.dumps(_body(api, "q \ud800", DOCS), ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert b"\xed\xa0\x80" in cesu
    for data, status, words in [*PARSE_ERRORS, (cesu, 422, "lone surrogate")]:
        r = _post_raw(url, api, data)
        assert r.status_code == status, (data[:40], r.status_code, r.text[:300])
        out = r.json()
        assert "detail" not in out and out["error"] == out["message"] and words in out["message"], out
        if status == 400:
            assert set(out) == ERROR_KEYS and out["error_type"] == "malformed_json", out
        else:
            assert set(out) == ERROR_KEYS | {"field"} and out["field"] == _query_field(api), out
    # The service still answers normally.
    ok = _post_raw(url, api, json.dumps(_body(api, QUERY, DOCS)).encode())
    assert ok.status_code == 200, ok.text


@pytest.mark.timeout(60)
def test_unknown_path_and_method_have_the_documented_body(service):
    url, _ = service
    missing = requests.post(f"{url}/v3/rerank", json={"query": "q"}, timeout=30)
    assert missing.status_code == 404 and set(missing.json()) == ERROR_KEYS, missing.text
    assert missing.json()["error_type"] == "not_found"
    wrong = requests.get(f"{url}/v2/rerank", timeout=30)
    assert wrong.status_code == 405 and set(wrong.json()) == ERROR_KEYS, wrong.text
    assert "POST" in wrong.headers.get("allow", "")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["v1/rerank", "v2/rerank"])
def test_integers_are_json_integers_only(service, api):
    """`top_n: true` was taken as 1: every non-integer where an integer is expected is a 422 naming the field."""
    url, _ = service
    base = {"model": "m", "query": QUERY, "documents": DOCS}
    for field, bad in [("top_n", True), ("top_n", False), ("top_n", "2"), ("top_n", 2.0), ("max_tokens_per_doc", True)]:
        r = requests.post(f"{url}/{api}", json={**base, field: bad}, timeout=30)
        assert r.status_code == 422, (field, bad, r.status_code, r.text)
        out = r.json()
        assert set(out) == ERROR_KEYS | {"field"} and out["field"] == field, out
        assert out["message"] == f"{field}: must be an integer" and out["error_type"] == "validation", out
    ok = requests.post(f"{url}/{api}", json={**base, "top_n": 2, "max_tokens_per_doc": 512}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2, ok.text
