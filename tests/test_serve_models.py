"""Several rerankers in one Serve application (`rerankers:`): two tiny cross-encoders and cascades over them, each
model its own deployment behind one ingress, routed by the request's `model` field.

No-Ray tests first (the config's rules, the deployments built from it, the ingress's routing outside Serve), then
one in-process Ray + Serve app on 127.0.0.1 for the rest of the module: routing by name in every API, unknown
names (404) and missing ones (400) in each API's error body, `/v1/models`, a cascade equal to the two client calls
it replaces, and one model's replica killed under load while the other keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time

import numpy as np
import pytest
import requests

from pipelines.config import ServeAppConfig, validate_config
from pipelines.errors import ConfigError
from tests.ports import free_port
from tests.ray_cluster import start_local_ray

QUERY = "what is the boundary layer of a supersonic wing"
DOCS = [
    "the boundary layer of a wing at supersonic mach number",
    "heat transfer in a shock wave",
    "pressure flow on the wing",
    "ray data model rank query passage",
    "the of and a to in is for",
    "laminar flow over a flat plate",
    "supersonic wind tunnel tests of a delta wing",
    "buckling of thin cylindrical shells",
    "skin friction in a turbulent boundary layer",
    "heat transfer to a blunt body at hypersonic speed",
]
KEEP = 4  # the cascade's first stage passes on its top 4
APP = "rerank-models-test"
ERROR_KEYS = {"message", "error", "error_type", "field"}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> tuple[str, str]:
    from tests.tiny_models import build_cross_encoder

    root = tmp_path_factory.mktemp("serve-models")
    return str(build_cross_encoder(root / "tiny-a", seed=0)), str(build_cross_encoder(root / "tiny-b", seed=1))


@pytest.fixture(scope="module")
def scorers(model_paths):
    """The batch job's scorer of each model in this process: the reference for every score."""
    from pipelines.config import ModelConfig
    from pipelines.model.scoring import Scorer

    return tuple(Scorer(ModelConfig(name_or_path=p, device="cpu", batch_size=8)) for p in model_paths)


def _model(path: str) -> dict:
    return {"name_or_path": path, "device": "cpu", "batch_size": 8, "num_threads": 1}


def _tree(a: str, b: str, **serve) -> dict:
    return {
        "rerankers": [
            {"name": "a", "model": _model(a), "serve": {"max_batch_pairs": 32}},
            {"name": "b", "model": _model(b)},
            {"name": "ab", "cascade": [{"reranker": "a", "keep": KEEP}, {"reranker": "b"}]},
            {"name": "a-own", "cascade": [{"reranker": "a", "keep": 3}, {"name": "big", "model": _model(b)}]},
        ],
        "serve": {"num_cpus_per_replica": 0.5, "api_key_env": "RERANK_TEST_UNSET_KEY", **serve},
    }


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------- no Ray


def test_config_rules_name_the_entry():
    base = _tree("pa", "pb")
    ok = validate_config(ServeAppConfig, base)
    assert set(ok.served_models()) == {"a", "b", "a-own.big"}  # a stage with its own model is its own deployment
    a, b = ok.served_models()["a"][1], ok.served_models()["b"][1]
    assert (a.max_batch_pairs, b.max_batch_pairs) == (32, 256) and a.num_cpus_per_replica == 0.5
    bad = [
        ({**base, "model": _model("m")}, "not both"),
        ({**base, "serve": {"default_model": "c"}}, "serve.default_model 'c' is not in rerankers"),
        ({**base, "serve": {"model_name": "x"}}, "each entry's name is its id"),
        (
            {"rerankers": [*base["rerankers"], {"name": "x", "cascade": [{"reranker": "ab", "keep": 2}, {"reranker": "b"}]}]},
            "cascades do not nest",
        ),
        (
            {"rerankers": [*base["rerankers"][:2], {"name": "c", "cascade": [{"reranker": "a", "keep": 2, "serve": {"num_replicas": 2}}, {"reranker": "b"}]}]},
            "set its serve: on the entry a",
        ),
        (
            {"rerankers": [{"name": "a.big", "model": _model("m")}, {"name": "a", "cascade": [{"reranker": "a.big", "keep": 2}, {"name": "big", "model": _model("m")}]}]},
            "names both an entry and a cascade stage",
        ),
        (
            {"rerankers": [{"name": "a", "model": _model("m"), "serve": {"max_ongoing_requests": 4, "autoscaling": {"target_ongoing_requests": 8}}}]},
            "rerankers: a: serve:",
        ),
        ({"rerankers": [{"name": "a", "model": _model("m"), "serve": {"num_replica": 2}}]}, "unknown key"),
        ({"model": _model("m"), "serve": {"default_model": "a"}}, "serve.default_model"),
    ]  # fmt: skip
    for tree, message in bad:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
            validate_config(ServeAppConfig, tree)


def test_each_model_is_its_own_deployment_behind_one_ingress():
    """The bound application: one deployment per model with its own settings (the entry's serve: over the top
    level's; its num_replicas replacing a top-level autoscaling), the ingress holding their handles."""
    from pipelines.serve.app import MODEL_DEPLOYMENT_PREFIX, build_app_from_config

    tree = _tree("pa", "pb", autoscaling={"max_replicas": 3})
    tree["rerankers"][0]["serve"] = {"num_replicas": 2, "num_cpus_per_replica": 1.5, "replica_resources": {"big": 1}}
    app = build_app_from_config(validate_config(ServeAppConfig, tree))
    ingress = app._bound_deployment
    assert ingress.name == "RerankRouter" and ingress.ray_actor_options["num_cpus"] == 0.25
    handles = ingress.init_args[1]
    assert set(handles) == {"a", "b", "a-own.big"}
    deps = {name: h._bound_deployment for name, h in handles.items()}
    assert {d.name for d in deps.values()} == {f"{MODEL_DEPLOYMENT_PREFIX}{n}" for n in ("a", "b", "a-own.big")}
    a, b = deps["a"], deps["b"]
    assert a.num_replicas == 2 and a._deployment_config.autoscaling_config is None
    assert a.ray_actor_options == {"num_cpus": 1.5, "num_gpus": 0.0, "resources": {"big": 1.0}}
    assert b._deployment_config.autoscaling_config.max_replicas == 3 and b.ray_actor_options["num_cpus"] == 0.5
    # Each model replica is built from a one-model config, validated again in the replica.
    (sub,) = a.init_args
    assert ServeAppConfig.model_validate(sub).serve.model_name == "a"


def test_the_example_config_builds():
    """conf/serve_models.yaml: two models and a cascade, each model its own deployment with its own settings."""
    from pathlib import Path

    from pipelines.config import load_config
    from pipelines.serve.app import build_app_from_config

    config = load_config(ServeAppConfig, Path(__file__).resolve().parent.parent / "conf/serve_models.yaml")
    assert [r.name for r in config.rerankers] == ["minilm", "bge", "minilm-then-bge"]
    handles = build_app_from_config(config)._bound_deployment.init_args[1]
    minilm, bge = (handles[n]._bound_deployment for n in ("minilm", "bge"))
    assert minilm._deployment_config.autoscaling_config.max_replicas == 4
    assert bge.num_replicas == 1 and bge.ray_actor_options["num_cpus"] == 1.0


def _router(tree: dict):
    """The ingress class outside Serve (no handles): its routing alone."""
    from pipelines.serve.app import RerankRouter

    ours = RerankRouter.func_or_class.__mro__[1]  # Serve's ingress wrapper around our class
    router = object.__new__(ours)
    ours.__init__(router, validate_config(ServeAppConfig, tree).model_dump(mode="json", exclude_unset=True), {})
    return router


def test_routing_rules():
    from pipelines.serve.api import ApiError

    router = _router(_tree("pa", "pb"))
    assert [(s.model, s.keep) for s in router._route("ab")] == [("a", KEEP), ("b", None)]
    assert [(s.model, s.keep) for s in router._route("a-own")] == [("a", 3), ("a-own.big", None)]
    with pytest.raises(ApiError) as err:
        router._route("rerank-v3.5")
    assert err.value.status == 404 and err.value.error_type == "model_not_found"
    assert err.value.field == "model" and "a, b, ab, a-own" in err.value.message
    with pytest.raises(ApiError) as err:
        router._route(None)
    assert (
        err.value.status == 400 and err.value.error_type == "model_required" and "a, b, ab, a-own" in err.value.message
    )
    assert set(err.value.body()) == ERROR_KEYS
    default = _tree("pa", "pb", default_model="ab")
    assert [s.model for s in _router(default)._route(None)] == ["a", "b"]
    one = {"rerankers": [{"name": "only", "model": _model("pa")}]}
    assert [s.model for s in _router(one)._route(None)] == ["only"]  # missing: fine with one entry


def test_cascade_keeps_the_global_top_and_maps_indices_back():
    """The ingress's cascade over stand-in models: stage 1 scores all, stage 2 only stage 1's top keep (sent best
    first), the result carries stage 2's scores and the request's own indices."""
    router = _router(_tree("pa", "pb"))
    first = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2])
    calls = []

    async def call(model, query, texts, refuse_long, idx):
        calls.append((model, list(texts), idx.tolist()))
        if model == "a":
            return first.copy(), _sigmoid(first)
        raw = np.array([float(len(t)) for t in texts])  # stage 2: longer is better
        return raw, _sigmoid(raw)

    router._call = call
    texts = ["t0", "t1-", "t2", "t3----", "t4", "t5--", "t6"]
    idx, raw, unit = asyncio.run(router._rank(router._route("ab"), "q", texts, None))
    assert calls[0] == ("a", texts, list(range(7)))
    assert calls[1] == ("b", ["t1-", "t5--", "t3----", "t2"], [1, 5, 3, 2])  # stage 1's top 4, best first
    assert idx.tolist() == [1, 5, 3, 2] and raw.tolist() == [3.0, 4.0, 6.0, 2.0]
    from pipelines.serve.api import tei_response
    from pipelines.serve.app import _reindex

    out = _reindex(tei_response(raw, unit, [texts[i] for i in idx], raw_scores=True, return_text=True), idx)
    assert [(x["index"], x["text"], x["score"]) for x in out] == [
        (3, "t3----", 6.0),
        (5, "t5--", 4.0),
        (1, "t1-", 3.0),
        (2, "t2", 2.0),
    ]


def test_a_models_faults_are_answered_naming_it():
    """The ingress's call of a model deployment, with stand-in handles: the model's own refusal comes back as its
    ApiError; its full queue is 503 overloaded, a lost replica 503 unavailable (both with Retry-After), a model
    slower than its request_timeout_s 408 (the call cancelled); each names the model."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from pipelines.serve.api import ApiError

    tree = _tree("pa", "pb", retry_after_s=7)
    tree["rerankers"][1]["serve"] = {"request_timeout_s": 0.2}
    router = _router(tree)

    class Response:
        def __init__(self, outcome):
            self.outcome, self.cancelled = outcome, False

        def __await__(self):
            if self.outcome == "slow":
                yield from asyncio.sleep(5).__await__()
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        def cancel(self):
            self.cancelled = True

    class Handle:
        def __init__(self, outcome):
            self.response = Response(outcome)
            self.score = self

        def remote(self, *args):
            return self.response

    refusal = {
        "status": 413,
        "message": "too long",
        "field": "texts[3]",
        "error_type": "payload_too_large",
        "headers": {},
    }
    cases = [
        ("a", {"error": refusal}, 413, "payload_too_large", None),
        ("a", BackPressureError(num_queued_requests=3, max_queued_requests=2), 503, "overloaded", "7"),
        ("a", ActorDiedError(), 503, "unavailable", "7"),
        ("b", "slow", 408, "timeout", None),
    ]
    for model, outcome, status, error_type, retry in cases:
        router.handles = {model: Handle(outcome)}
        with pytest.raises(ApiError) as err:
            asyncio.run(router._call(model, "q", ["t"], None, np.arange(1)))
        assert (err.value.status, err.value.error_type) == (status, error_type), err.value.message
        assert err.value.headers.get("Retry-After") == retry
        if status != 413:
            assert f"model {model}" in err.value.message
    assert router.handles["b"].response.cancelled
    assert err.value.message.startswith("model b did not score this request within 0.2 s")
    router.handles = {"a": Handle({"raw": np.ones(1), "unit": np.ones(1)})}
    raw, unit = asyncio.run(router._call("a", "q", ["t"], None, np.arange(1)))
    assert raw.tolist() == unit.tolist() == [1.0]


# ---------------------------------------------------------------------------------------------- in-process Ray


@pytest.fixture(scope="module")
def service(model_paths):
    import os

    import ray
    from ray import serve

    from pipelines.serve import start_service
    from tests.test_serve import _wait_healthy

    port = free_port()
    config = validate_config(ServeAppConfig, _tree(*model_paths, port=port, app_name=APP, batch_wait_timeout_s=0.02))
    os.environ.pop("RERANK_TEST_UNSET_KEY", None)
    start_local_ray()
    try:
        start_service(config)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, timeout=90)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, path: str, body: dict, timeout: float = 60) -> requests.Response:
    return requests.post(f"{url}/{path}", json=body, timeout=timeout)


def _stats(model: str) -> dict:
    from ray import serve

    from pipelines.serve.app import MODEL_DEPLOYMENT_PREFIX

    return serve.get_deployment_handle(f"{MODEL_DEPLOYMENT_PREFIX}{model}", APP).stats.remote().result(timeout_s=30)


@pytest.mark.timeout(120)
def test_health_and_models_list_every_entry(service, model_paths):
    url = service
    health = requests.get(f"{url}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {
        "status": "ok",
        "models": {"a": "ok", "b": "ok", "a-own.big": "ok"},
    }
    models = requests.get(f"{url}/v1/models", timeout=30).json()
    assert models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert list(by_id) == ["a", "b", "ab", "a-own"]
    assert by_id["a"]["kind"] == "model" and by_id["a"]["model_kind"] == "cross-encoder"
    assert by_id["a"]["max_length"] == 128 and "stages" not in by_id["a"]
    assert by_id["ab"]["kind"] == "cascade"
    assert [(s["name"], s["model"], s["keep"]) for s in by_id["ab"]["stages"]] == [("a", "a", KEEP), ("b", "b", None)]
    assert [(s["name"], s["model"], s["keep"]) for s in by_id["a-own"]["stages"]] == [
        ("a", "a", 3),
        ("big", "a-own.big", None),
    ]


@pytest.mark.timeout(120)
def test_requests_are_routed_by_model_name(service, scorers):
    """Each API's model field picks the model (TEI's extension field too): the scores are that model's."""
    url = service
    for name, scorer in zip(("a", "b"), scorers):
        raw = scorer.score([QUERY] * len(DOCS), DOCS)
        order = np.argsort(-raw, kind="stable")
        v2 = _post(url, "v2/rerank", {"model": name, "query": QUERY, "documents": DOCS, "top_n": 3})
        assert v2.status_code == 200, v2.text
        assert [x["index"] for x in v2.json()["results"]] == order[:3].tolist()
        assert np.allclose([x["relevance_score"] for x in v2.json()["results"]], _sigmoid(raw[order[:3]]), atol=1e-4)
        nim = _post(
            url, "v1/ranking", {"model": name, "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCS]}
        )
        assert [x["index"] for x in nim.json()["rankings"]] == order.tolist()
        assert np.allclose([x["logit"] for x in nim.json()["rankings"]], raw[order], atol=1e-4)
        tei = _post(url, "rerank", {"model": name, "query": QUERY, "texts": DOCS, "raw_scores": True})
        assert np.allclose([x["score"] for x in tei.json()], raw[order], atol=1e-4)
    import cohere

    v1 = cohere.Client(api_key="unused", base_url=url).rerank(model="b", query=QUERY, documents=DOCS, top_n=2)
    raw_b = scorers[1].score([QUERY] * len(DOCS), DOCS)
    assert [r.index for r in v1.results] == np.argsort(-raw_b, kind="stable")[:2].tolist()


UNKNOWN = [
    ("v1/rerank", {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS}),
    ("v2/rerank", {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS}),
    ("rerank", {"model": "rerank-v3.5", "query": QUERY, "texts": DOCS}),
    ("v1/ranking", {"model": "rerank-v3.5", "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCS]}),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("path", "body"), UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_unknown_name_is_404_and_missing_is_400_naming_the_models(service, path, body):
    url = service
    r = _post(url, path, body)
    assert r.status_code == 404, r.text
    out = r.json()
    assert set(out) == ERROR_KEYS and out["error"] == out["message"] and out["error_type"] == "model_not_found"
    assert out["field"] == "model" and "'rerank-v3.5'" in out["message"] and "a, b, ab, a-own" in out["message"]
    missing = _post(url, path, {k: v for k, v in body.items() if k != "model"})
    assert missing.status_code == 400, missing.text
    out = missing.json()
    assert out["error_type"] == "model_required" and out["field"] == "model" and "a, b, ab, a-own" in out["message"]


@pytest.mark.timeout(60)
def test_cohere_sdk_sees_404(service):
    import cohere

    with pytest.raises(cohere.errors.NotFoundError) as err:
        cohere.ClientV2(api_key="unused", base_url=service).rerank(model="nope", query=QUERY, documents=DOCS)
    assert "a, b, ab, a-own" in str(err.value)


def _client_cascade(url: str, first: str, keep: int, second: str, top_n: int | None) -> list[tuple[int, float, str]]:
    """What a client does without a cascade: call the first model, keep its top `keep`, call the second on those
    (in the first's order), map the indices back. (index, relevance_score, text) best first."""
    one = _post(url, "v2/rerank", {"model": first, "query": QUERY, "documents": DOCS}).json()["results"]
    kept = [x["index"] for x in one[:keep]]
    body = {"model": second, "query": QUERY, "documents": [DOCS[i] for i in kept], "return_documents": True}
    if top_n is not None:
        body["top_n"] = top_n
    two = _post(url, "v2/rerank", body).json()["results"]
    return [(kept[x["index"]], x["relevance_score"], x["document"]["text"]) for x in two]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("cascade", "first", "keep", "second"), [("ab", "a", KEEP, "b"), ("a-own", "a", 3, "b")])
def test_a_cascade_equals_the_two_client_calls(service, scorers, cascade, first, keep, second):
    url = service
    for top_n in (None, 2, 50):
        expected = _client_cascade(url, first, keep, second, top_n)
        body = {"model": cascade, "query": QUERY, "documents": DOCS, "return_documents": True}
        if top_n is not None:
            body["top_n"] = top_n
        got = _post(url, "v2/rerank", body)
        assert got.status_code == 200, got.text
        results = [(x["index"], x["relevance_score"], x["document"]["text"]) for x in got.json()["results"]]
        assert [r[0] for r in results] == [e[0] for e in expected]
        assert [r[2] for r in results] == [DOCS[r[0]] for r in results] == [e[2] for e in expected]
        assert np.allclose([r[1] for r in results], [e[1] for e in expected], atol=1e-5)
        assert len(results) == min(keep, top_n or keep)
    # The scores are the last stage's, on the request's own documents; each API's shape.
    raw_a = scorers[0].score([QUERY] * len(DOCS), DOCS)
    kept = np.argsort(-raw_a, kind="stable")[:keep]
    raw_b = scorers[1].score([QUERY] * len(kept), [DOCS[i] for i in kept])
    order = kept[np.argsort(-raw_b, kind="stable")]
    nim = _post(
        url, "v1/ranking", {"model": cascade, "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCS]}
    )
    assert [x["index"] for x in nim.json()["rankings"]] == order.tolist()
    assert np.allclose([x["logit"] for x in nim.json()["rankings"]], np.sort(raw_b)[::-1], atol=1e-4)
    tei = _post(url, "rerank", {"model": cascade, "query": QUERY, "texts": DOCS, "return_text": True}).json()
    assert [(x["index"], x["text"]) for x in tei] == [(int(i), DOCS[i]) for i in order]


@pytest.mark.timeout(120)
def test_a_cascade_scores_only_what_the_first_stage_kept(service):
    before_a, before_b = _stats("a"), _stats("b")
    r = _post(service, "v1/rerank", {"model": "ab", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200
    after_a, after_b = _stats("a"), _stats("b")
    assert after_a["pairs"] - before_a["pairs"] == len(DOCS)
    assert after_b["pairs"] - before_b["pairs"] == KEEP
    assert after_b["requests"] - before_b["requests"] == 1


@pytest.mark.timeout(120)
def test_a_cascade_refusal_names_the_requests_document(service):
    """TEI without truncate: a pair the stage's model would cut is 413 naming the document's index in the request
    (a later stage scores a subset)."""
    long_doc = "boundary layer " * 80  # past the tiny models' 128 tokens
    texts = [*DOCS[:6], long_doc]
    r = _post(service, "rerank", {"model": "ab", "query": QUERY, "texts": texts})
    assert r.status_code == 413 and r.json()["field"] == "texts[6]", r.text
    ok = _post(service, "rerank", {"model": "ab", "query": QUERY, "texts": texts, "truncate": True})
    assert ok.status_code == 200 and len(ok.json()) == KEEP


@pytest.mark.timeout(240)
def test_one_models_replica_killed_under_load_leaves_the_other_serving(service, scorers):
    """Requests to a and b from 8 threads; a's replica actor is killed meanwhile: every b request is answered 200
    with b's scores, a's requests get 200 or 503 unavailable (with Retry-After), and a serves again once Serve has
    restarted its replica."""
    import ray

    from pipelines.serve.app import MODEL_DEPLOYMENT_PREFIX

    url = service
    raw_b = scorers[1].score([QUERY] * len(DOCS), DOCS)
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"#{MODEL_DEPLOYMENT_PREFIX}a#" in a["name"] and a["name"].startswith("SERVE_REPLICA")
    ]
    assert len(names) == 1, names
    victim = ray.get_actor(names[0], namespace="serve")
    stop = threading.Event()
    results: dict[str, list] = {"a": [], "b": []}

    def load(model: str) -> None:
        while not stop.is_set():
            try:
                r = _post(
                    url,
                    "v1/ranking",
                    {"model": model, "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCS]},
                    timeout=90,
                )
            except requests.RequestException as err:  # never expected: counted as a failure
                results[model].append((0, str(err), {}))
                continue
            results[model].append((r.status_code, r.json(), dict(r.headers)))

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(load, m) for m in ("a", "b") * 4]
        time.sleep(3)
        ray.kill(victim, no_restart=False)
        time.sleep(8)
        stop.set()
        for f in futures:
            f.result(timeout=120)
    assert len(results["b"]) >= 8, len(results["b"])
    assert {code for code, _, _ in results["b"]} == {200}, [r for r in results["b"] if r[0] != 200][:3]
    for _, body, _ in results["b"]:
        got = {x["index"]: x["logit"] for x in body["rankings"]}
        assert np.allclose([got[i] for i in range(len(DOCS))], raw_b, atol=1e-4)
    codes_a = [code for code, _, _ in results["a"]]
    assert set(codes_a) <= {200, 503}, [r for r in results["a"] if r[0] not in (200, 503)][:3]
    for code, body, headers in results["a"]:
        if code == 503:
            assert body["error_type"] in ("unavailable", "overloaded") and "retry-after" in {h.lower() for h in headers}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve restarts a's replica
        r = _post(url, "v1/ranking", {"model": "a", "query": {"text": QUERY}, "passages": [{"text": DOCS[0]}]})
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
