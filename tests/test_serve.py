"""The online service on 127.0.0.1 with a tiny cross-encoder: every API's shape, score parity with the batch
Scorer, batching, bad input, overload, auth, and `rerank serve` starting and stopping cleanly.

Two Ray instances, one after the other: the `rerank serve` subprocess (auth on, clean shutdown) runs first and
is gone before the module's in-process Ray + Serve app (auth off) starts.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from pipelines.config import ModelConfig, ServeAppConfig, validate_config
from pipelines.errors import ConfigError
from tests.ports import free_port, port_open
from tests.ray_cluster import start_local_ray

ROOT = Path(__file__).resolve().parent.parent
QUERY = "what is the boundary layer of a supersonic wing"
DOCS = [
    "the boundary layer of a wing at supersonic mach number",
    "heat transfer in a shock wave",
    "pressure flow on the wing",
    "ray data model rank query passage",
    "the of and a to in is for",
]


def _wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"`rerank serve` exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        try:
            res = requests.get(f"{url}/health", timeout=2)
            if res.status_code == 200 and res.json().get("status") == "ok":  # our service, not another server
                return
        except (requests.ConnectionError, requests.Timeout, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/health not ready after {timeout} s")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from tests.tiny_models import build_cross_encoder

    return str(build_cross_encoder(tmp_path_factory.mktemp("serve-models") / "tiny-ce"))


@pytest.fixture(scope="module")
def scorer(model_path):
    """The batch job's scorer in this process: the reference for every score the service returns."""
    from pipelines.model.scoring import Scorer

    return Scorer(ModelConfig(name_or_path=model_path, device="cpu", batch_size=8))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------- no Ray


def test_config_files_validate():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from pipelines.config import load_config
    from pipelines.serve import load_serve_config

    local = load_config(ServeAppConfig, ROOT / "conf/serve.yaml")
    assert (local.serve.host, local.serve.port) == ("127.0.0.1", 8000)
    deploy = yaml.safe_load((ROOT / "conf/serve_deploy.yaml").read_text())
    ServeDeploySchema.model_validate(deploy)
    app = deploy["applications"][0]
    assert app["import_path"] == "pipelines.serve:build_app"
    assert load_serve_config(app["args"]).serve.autoscaling.max_replicas >= 1


def test_config_errors_name_the_key():
    base = {"model": {"name_or_path": "m"}}
    with pytest.raises(ConfigError, match="serve.num_replicas or serve.autoscaling"):
        validate_config(ServeAppConfig, {**base, "serve": {"num_replicas": 2, "autoscaling": {"max_replicas": 3}}})
    with pytest.raises(ConfigError, match="serve.max_batch_pairs"):
        validate_config(ServeAppConfig, {**base, "serve": {"max_batch_pairs": 0}})
    with pytest.raises(ConfigError, match="serve.max_docs: unknown key"):
        validate_config(ServeAppConfig, {**base, "serve": {"max_docs": 5}})


def test_auto_gpus_per_replica_follow_the_model_device(monkeypatch):
    """On a cluster with GPUs (Ray's view of it stood in for: this machine has none), auto gives each replica a
    GPU unless model.device is cpu."""
    import ray

    from pipelines.serve.app import replica_gpus

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    for device, gpus in (("auto", 1.0), ("cuda", 1.0), ("cpu", 0.0)):
        config = validate_config(ServeAppConfig, {"model": {"name_or_path": "m", "device": device}})
        assert replica_gpus(config) == gpus, device


def test_deployment_options_from_config():
    from pipelines.serve.app import deployment_options, replica_init_args

    fixed = validate_config(
        ServeAppConfig,
        {
            "model": {"name_or_path": "m"},
            "serve": {"num_replicas": 3, "num_gpus_per_replica": 1, "num_cpus_per_replica": 4},
        },
    )
    opts = deployment_options(fixed)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": 2}
    auto = validate_config(
        ServeAppConfig,
        {"model": {"name_or_path": "m"}, "serve": {"autoscaling": {"min_replicas": 0, "max_replicas": 5}}},
    )
    opts = deployment_options(auto)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"]["min_replicas"] == 0 and opts["autoscaling_config"]["max_replicas"] == 5
    for config in (fixed, auto):  # each replica validates its config again
        assert ServeAppConfig.model_validate(replica_init_args(config)[0]) == config


def test_exposure_needs_an_api_key(monkeypatch):
    from pipelines.serve import check_exposure

    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    cfg = {"model": {"name_or_path": "m"}}
    check_exposure(validate_config(ServeAppConfig, cfg))  # loopback: fine without a key
    public = {**cfg, "serve": {"host": "0.0.0.0"}}
    with pytest.raises(ConfigError, match="RERANK_API_KEY"):
        check_exposure(validate_config(ServeAppConfig, public))
    monkeypatch.setenv("RERANK_API_KEY", "k")
    check_exposure(validate_config(ServeAppConfig, public))
    monkeypatch.delenv("RERANK_API_KEY")
    check_exposure(
        validate_config(ServeAppConfig, {**cfg, "serve": {"host": "0.0.0.0", "allow_unauthenticated": True}})
    )


# ---------------------------------------------------------------------------------------------- `rerank serve`


@pytest.mark.timeout(180)
def test_cli_serves_with_api_key_and_stops_cleanly(model_path, scorer):
    """The user's path: `rerank serve conf/serve.yaml --set ...` with RERANK_API_KEY, then Ctrl-C."""
    import cohere

    port = free_port()
    env = dict(os.environ, RERANK_API_KEY="s3cret", PYTHONPATH=str(ROOT), RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable, "-m", "pipelines.cli", "serve", str(ROOT / "conf/serve.yaml"),
        "--set", f"model.name_or_path={model_path}", "--set", "model.device=cpu",
        "--set", f"serve.port={port}", "--set", "serve.num_cpus_per_replica=0.5",
        "--set", "ray.num_cpus=2", "--set", "serve.autoscaling.max_replicas=1",
        "--set", "serve.autoscaling.target_ongoing_requests=8",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, timeout=150, proc=proc)  # /health needs no key: load balancers probe it
        body = {"query": QUERY, "documents": DOCS}
        no_key = requests.post(f"{url}/v1/rerank", json=body, timeout=30)
        assert no_key.status_code == 401 and "API key" in no_key.json()["message"], (no_key.status_code, no_key.text)
        assert no_key.headers["www-authenticate"] == "Bearer"
        wrong = requests.post(f"{url}/v2/rerank", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
        # The Cohere SDK sends its api_key as the bearer token.
        res = cohere.ClientV2(api_key="s3cret", base_url=url).rerank(model="any", query=QUERY, documents=DOCS)
        expected = _sigmoid(scorer.score([QUERY] * len(DOCS), DOCS))
        assert [r.index for r in res.results] == list(np.argsort(-expected, kind="stable"))
        assert np.allclose([r.relevance_score for r in res.results], np.sort(expected)[::-1], atol=1e-4)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"`rerank serve` did not stop on Ctrl-C: {out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    assert "service stopped" in out
    assert "Traceback" not in out, out[-3000:]
    assert not port_open(port)


# ---------------------------------------------------------------------------------------------- in-process


MAX_DOCUMENTS = 1200
MAX_TEXT_CHARS = 2000
MAX_BATCH_PAIRS = 64


@pytest.fixture(scope="module")
def service(model_path):
    """One Ray and one Serve app for the rest of the module: auth off, tight limits so overload is reachable."""
    import ray
    from ray import serve

    from pipelines.serve import start_service

    port = free_port()
    config = validate_config(
        ServeAppConfig,
        {
            "model": {"name_or_path": model_path, "device": "cpu", "batch_size": 8, "num_threads": 1},
            "serve": {
                "port": port,
                "app_name": "rerank-test",
                "num_cpus_per_replica": 0.5,
                "max_batch_pairs": MAX_BATCH_PAIRS,
                "batch_wait_timeout_s": 0.1,  # wide, so concurrent requests reliably share batches
                "max_documents": MAX_DOCUMENTS,
                "max_text_chars": MAX_TEXT_CHARS,
                "max_ongoing_requests": 8,
                "max_queued_requests": 4,
                "max_queued_pairs": 2500,
                "retry_after_s": 3,
                "api_key_env": "RERANK_TEST_UNSET_KEY",
            },
        },
    )
    os.environ.pop("RERANK_TEST_UNSET_KEY", None)
    start_local_ray()
    try:
        start_service(config)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, timeout=60)
        yield url, serve.get_app_handle("rerank-test"), port
    finally:
        serve.shutdown()
        ray.shutdown()


def _stats(handle) -> dict:
    return handle.stats.remote().result(timeout_s=30)


@pytest.mark.timeout(120)
def test_health_and_models(service, model_path):
    url, _, _ = service
    health = requests.get(f"{url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == Path(model_path).name
    assert models["data"][0]["max_documents"] == MAX_DOCUMENTS


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cohere_shape_and_parity(service, scorer, version):
    url, _, _ = service
    raw = scorer.score([QUERY] * len(DOCS), DOCS)
    documents = [DOCS[0], {"text": DOCS[1]}, *DOCS[2:]]  # strings or {text}
    r = requests.post(
        f"{url}/{version}/rerank",
        json={"model": "rerank-v3.5", "query": QUERY, "documents": documents, "top_n": 3, "return_documents": True},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"id", "results", "meta"} and out["id"]
    assert out["meta"]["api_version"]["version"] == version[1]
    order = np.argsort(-raw, kind="stable")[:3]
    assert [x["index"] for x in out["results"]] == order.tolist()
    assert np.allclose([x["relevance_score"] for x in out["results"]], _sigmoid(raw[order]), atol=1e-4)
    assert all(0.0 <= x["relevance_score"] <= 1.0 for x in out["results"])
    assert [x["document"]["text"] for x in out["results"]] == [DOCS[i] for i in order]
    bare = requests.post(f"{url}/{version}/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30).json()
    assert len(bare["results"]) == len(DOCS) and "document" not in bare["results"][0]


@pytest.mark.timeout(60)
def test_cohere_sdk(service, scorer):
    import cohere

    url, _, _ = service
    expected = _sigmoid(scorer.score([QUERY] * len(DOCS), DOCS))
    v2 = cohere.ClientV2(api_key="unused", base_url=url).rerank(model="m", query=QUERY, documents=DOCS, top_n=2)
    assert [r.index for r in v2.results] == np.argsort(-expected, kind="stable")[:2].tolist()
    assert np.allclose([r.relevance_score for r in v2.results], np.sort(expected)[::-1][:2], atol=1e-4)
    v1 = cohere.Client(api_key="unused", base_url=url).rerank(query=QUERY, documents=DOCS, return_documents=True)
    assert {r.index: r.document.text for r in v1.results} == dict(enumerate(DOCS))
    with pytest.raises(cohere.errors.UnprocessableEntityError):
        cohere.ClientV2(api_key="unused", base_url=url).rerank(model="m", query=QUERY, documents=DOCS, top_n=0)


@pytest.mark.timeout(60)
def test_tei_shape_and_parity(service, scorer):
    url, _, _ = service
    raw = scorer.score([QUERY] * len(DOCS), DOCS)
    order = np.argsort(-raw, kind="stable")
    r = requests.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, list) and [x["index"] for x in out] == order.tolist()
    assert np.allclose([x["score"] for x in out], _sigmoid(raw[order]), atol=1e-4)
    assert [x["text"] for x in out] == [DOCS[i] for i in order]
    raw_out = requests.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}, timeout=30)
    assert np.allclose([x["score"] for x in raw_out.json()], raw[order], atol=1e-4)
    assert "text" not in raw_out.json()[0]


@pytest.mark.timeout(60)
def test_nim_shape_and_parity(service, scorer):
    url, _, _ = service
    raw = scorer.score([QUERY] * len(DOCS), DOCS)
    order = np.argsort(-raw, kind="stable")
    body = {
        "model": "nvidia/nv-rerankqa-mistral-4b-v3",
        "query": {"text": QUERY},
        "passages": [{"text": d} for d in DOCS],
    }
    r = requests.post(f"{url}/v1/ranking", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"rankings"}
    assert [x["index"] for x in out["rankings"]] == order.tolist()
    assert np.allclose([x["logit"] for x in out["rankings"]], raw[order], atol=1e-4)


@pytest.mark.timeout(60)
def test_nim_langchain_client(service, scorer):
    """LangChain's NVIDIA reranker (the NIM client) pointed at this service's /v1 base URL."""
    from langchain_core.documents import Document
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    url, _, _ = service
    raw = scorer.score([QUERY] * len(DOCS), DOCS)
    ranker = NVIDIARerank(base_url=f"{url}/v1", model="rerank-serve-tiny", api_key="unused", top_n=3)
    out = ranker.compress_documents(query=QUERY, documents=[Document(page_content=d) for d in DOCS])
    order = np.argsort(-raw, kind="stable")[:3]
    assert [d.page_content for d in out] == [DOCS[i] for i in order]
    assert np.allclose([d.metadata["relevance_score"] for d in out], raw[order], atol=1e-4)


@pytest.mark.timeout(60)
def test_long_input_truncate_follows_each_api(service, scorer):
    """TEI (truncate: false) and NIM (truncate: NONE) refuse a pair past the model's max length by default, as
    the real servers do; asked to truncate they score it like the batch job (which always cuts the passage)."""
    url, _, _ = service
    long_doc = " ".join(["boundary layer"] * 80)  # 160 tokens, the tiny model takes 128
    texts = [DOCS[0], long_doc]
    tei = requests.post(f"{url}/rerank", json={"query": QUERY, "texts": texts}, timeout=30)
    assert tei.status_code == 413 and tei.json()["field"] == "texts[1]" and "truncate" in tei.json()["message"]
    nim_body = {"model": "m", "query": {"text": QUERY}, "passages": [{"text": t} for t in texts]}
    nim = requests.post(f"{url}/v1/ranking", json=nim_body, timeout=30)
    assert nim.status_code == 413 and nim.json()["field"] == "passages[1].text"
    raw = scorer.score([QUERY] * 2, texts)
    ok = requests.post(f"{url}/v1/ranking", json={**nim_body, "truncate": "END"}, timeout=30).json()
    assert np.allclose(sorted(x["logit"] for x in ok["rankings"]), sorted(raw), atol=1e-4)
    ok = requests.post(f"{url}/rerank", json={"query": QUERY, "texts": texts, "truncate": True, "raw_scores": True})
    assert ok.status_code == 200 and np.allclose(sorted(x["score"] for x in ok.json()), sorted(raw), atol=1e-4)
    cohere_ok = requests.post(f"{url}/v2/rerank", json={"query": QUERY, "documents": texts}, timeout=30)
    assert cohere_ok.status_code == 200  # Cohere truncates long documents


BAD = [
    ("v1/rerank", b'{"query": "q", "documents": ["a"', 400, None),
    ("v1/rerank", b"not json", 400, None),
    ("v2/rerank", b"[1, 2]", 400, None),
    ("v1/rerank", {"documents": ["a"]}, 422, "query"),
    ("v2/rerank", {"query": "", "documents": ["a"]}, 422, "query"),
    ("v2/rerank", {"query": 5, "documents": ["a"]}, 422, "query"),
    ("v2/rerank", {"query": "q"}, 422, "documents"),
    ("v2/rerank", {"query": "q", "documents": []}, 422, "documents"),
    ("v2/rerank", {"query": "q", "documents": "a"}, 422, "documents"),
    ("v2/rerank", {"query": "q", "documents": ["a", 3]}, 422, "documents[1]"),
    ("v2/rerank", {"query": "q", "documents": ["a", None]}, 422, "documents[1]"),
    ("v1/rerank", {"query": "q", "documents": ["a", {"txt": "b"}]}, 422, "documents[1]"),
    ("v2/rerank", {"query": "q", "documents": ["a", "  "]}, 422, "documents[1]"),
    ("v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ("v2/rerank", {"query": "q", "documents": ["a"], "top_n": -3}, 422, "top_n"),
    ("v2/rerank", {"query": "q", "documents": ["a"], "top_n": "many"}, 422, "top_n"),
    ("v2/rerank", {"query": "q", "documents": ["a"] * (MAX_DOCUMENTS + 1)}, 413, "documents"),
    ("v2/rerank", {"query": "q", "documents": ["a", "x" * (MAX_TEXT_CHARS + 1)]}, 413, "documents[1]"),
    ("v2/rerank", {"query": "x" * (MAX_TEXT_CHARS + 1), "documents": ["a"]}, 413, "query"),
    ("rerank", {"query": "q", "texts": ["a", 1]}, 422, "texts[1]"),
    ("rerank", {"query": "q", "texts": []}, 422, "texts"),
    ("rerank", {"texts": ["a"]}, 422, "query"),
    ("rerank", {"query": "q", "texts": ["a"], "raw_scores": "maybe"}, 422, "raw_scores"),
    ("v1/ranking", {"model": "m", "query": "q", "passages": [{"text": "a"}]}, 422, "query"),
    ("v1/ranking", {"model": "m", "query": {"text": "q"}, "passages": [{"text": "a"}, {"text": 7}]}, 422, "passages[1].text"),
    ("v1/ranking", {"model": "m", "query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "MIDDLE"}, 422, "truncate"),
    ("v1/ranking", {"model": "m", "query": {"text": "q"}, "passages": [{"text": ""}]}, 422, "passages[0].text"),
]  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("path", "body", "status", "field"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_4xx_naming_the_field(service, path, body, status, field):
    url, _, _ = service
    if isinstance(body, bytes):
        r = requests.post(f"{url}/{path}", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = requests.post(f"{url}/{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    out = r.json()
    assert out["message"] and out["error"] == out["message"]
    if field is not None:
        assert out["field"] == field
        assert out["message"].startswith(f"{field}: ")


@pytest.mark.timeout(60)
def test_body_without_json_content_type_is_400(service):
    url, _, _ = service
    r = requests.post(f"{url}/v1/rerank", data=b'{"query": "q", "documents": ["a"]}', timeout=30)
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["message"]


@pytest.mark.timeout(120)
def test_concurrent_requests_share_batches(service, scorer):
    url, handle, _ = service
    before = _stats(handle)
    barrier = threading.Barrier(4)
    queries = [f"{QUERY} {w}" for w in ("flow", "heat", "shock", "mach")]

    def call(q):
        barrier.wait()
        return requests.post(
            f"{url}/v1/ranking",
            json={"model": "m", "query": {"text": q}, "passages": [{"text": d} for d in DOCS]},
            timeout=60,
        )

    with cf.ThreadPoolExecutor(4) as ex:
        responses = list(ex.map(call, queries))
    after = _stats(handle)
    assert [r.status_code for r in responses] == [200] * 4
    for q, r in zip(queries, responses):  # each request gets its own scores back, not a neighbour's
        raw = scorer.score([q] * len(DOCS), DOCS)
        got = {x["index"]: x["logit"] for x in r.json()["rankings"]}
        assert np.allclose([got[i] for i in range(len(DOCS))], raw, atol=1e-4)
    assert after["requests"] - before["requests"] == 4
    assert after["batches"] - before["batches"] < 4, after  # fewer model calls than requests
    assert after["max_batch_requests"] >= 2


@pytest.mark.timeout(120)
def test_large_request_is_split_across_batches(service, scorer):
    url, handle, _ = service
    docs = [f"{DOCS[i % len(DOCS)]} {i}" for i in range(1000)]
    before = _stats(handle)
    r = requests.post(f"{url}/v2/rerank", json={"query": QUERY, "documents": docs}, timeout=90)
    after = _stats(handle)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == list(range(1000))
    expected = _sigmoid(scorer.score([QUERY] * len(docs), docs))
    got = np.empty(1000)
    for x in results:
        got[x["index"]] = x["relevance_score"]
    assert np.allclose(got, expected, atol=1e-4)
    assert after["batches"] - before["batches"] >= 1000 // MAX_BATCH_PAIRS
    assert after["max_batch_pairs"] <= MAX_BATCH_PAIRS


@pytest.mark.timeout(120)
def test_overload_is_503_with_retry_after(service):
    """A flood past the queue limits: refused with 503 + Retry-After (by Serve's proxy past max_queued_requests,
    by the replica past max_queued_pairs), never a 500, and the service answers normally afterwards."""
    url, handle, _ = service
    docs = [f"{DOCS[i % len(DOCS)]} {i}" for i in range(1000)]

    flood = 32
    barrier = threading.Barrier(flood)

    def call(_):
        barrier.wait()
        return requests.post(f"{url}/v2/rerank", json={"query": QUERY, "documents": docs}, timeout=90)

    with cf.ThreadPoolExecutor(flood) as ex:
        responses = list(ex.map(call, range(flood)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, codes
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "3" for r in refused)
    replica_refusals = [r for r in refused if r.headers.get("content-type", "").startswith("application/json")]
    assert replica_refusals and all(r.json()["error_type"] == "overloaded" for r in replica_refusals)
    assert len(replica_refusals) < len(refused)  # the others came from the proxy's queue limit
    after = requests.post(f"{url}/v2/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
    assert after.status_code == 200
    assert _stats(handle)["pending_pairs"] == 0


@pytest.mark.timeout(60)
def test_metrics_are_registered(service):
    """Request counts, latency and batch sizes go through Ray's metrics agent (scraped by Prometheus)."""
    import ray

    url, _, _ = service
    requests.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
    node = ray._private.worker._global_node
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=10).text
        if "ray_rerank_batch_pairs" in text and "ray_rerank_requests" in text:
            break
        time.sleep(2)
    for name in ("ray_rerank_requests", "ray_rerank_request_latency_ms", "ray_rerank_batch_pairs"):
        assert name in text, name
    assert 'api="cohere_v1"' in text


@pytest.mark.timeout(60)
def test_shutdown_frees_the_port(service):
    """Runs last: deleting the app and shutting Serve down closes the HTTP port (the fixture's teardown then
    finds nothing left to stop)."""
    from ray import serve

    _, _, port = service
    assert port_open(port)
    serve.shutdown()
    deadline = time.monotonic() + 30
    while port_open(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not port_open(port)
