"""The online service under faults, on 127.0.0.1 with a tiny cross-encoder: a replica SIGKILLed under load (clients
see 200 or 503, never a hang, and the service recovers on its own), `/health` while no replica is up, the health
check failing on a broken model, and the API key enforced while absent from Ray's metadata.

No-Ray tests first; then one in-process Ray + Serve app for the rest of the module (auth on, the proxy middleware
of `pipelines.serve.proxy` loaded through the environment, as `rerank serve` does).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import requests

from pipelines.config import ServeAppConfig, validate_config
from pipelines.errors import ConfigError
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "RERANK_FAULT_TEST_KEY"
KEY = "fault-test-" + secrets.token_hex(12)  # unique: its bytes must appear nowhere in Ray's metadata
QUERY = "what is the boundary layer of a supersonic wing"
DOCS = [
    "the boundary layer of a wing at supersonic mach number",
    "heat transfer in a shock wave",
    "pressure flow on the wing",
    "the of and a to in is for",
]
REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from tests.tiny_models import build_cross_encoder

    return str(build_cross_encoder(tmp_path_factory.mktemp("fault-models") / "tiny-ce"))


def _config(model_path: str, **serve) -> ServeAppConfig:
    return validate_config(
        ServeAppConfig,
        {
            "model": {"name_or_path": model_path, "device": "cpu", "batch_size": 8, "num_threads": 1},
            "serve": {"api_key_env": KEY_ENV, **serve},
        },
    )


# ---------------------------------------------------------------------------------------------- no Ray


def test_the_key_is_not_in_what_ray_stores(monkeypatch):
    """The bound application (pickled and stored by Serve's controller) carries no key, whether it came from the
    environment or from the deprecated serve.api_key."""
    from pipelines.serve.app import build_app_from_config, replica_init_args

    monkeypatch.setenv(KEY_ENV, KEY)
    for config in (_config("m"), _config("m", api_key=KEY + "-cfg")):
        (args,) = replica_init_args(config)
        assert "api_key" not in args.get("serve", {})
        d = build_app_from_config(config)._bound_deployment  # what serve.run hands the controller
        stored = (d.init_args, d.init_kwargs, d.ray_actor_options, d.user_config, d._deployment_config)
        blob = cloudpickle.dumps(stored) + d._replica_config.serialized_init_args
        assert KEY.encode() not in blob and b"-cfg" not in blob


def test_serve_config_file_refuses_api_key():
    from pipelines.serve import build_app

    with pytest.raises(ConfigError, match="Ray's metadata.*RERANK_API_KEY"):
        build_app({"model": {"name_or_path": "m"}, "serve": {"api_key": "x"}})


def test_local_serve_moves_a_config_key_into_the_environment(monkeypatch):
    """`rerank serve` with the deprecated serve.api_key: the key goes into the replicas' variable before a local
    Ray starts (its workers inherit it); joining a cluster, it is refused."""
    from pipelines.serve import prepare_local_environment
    from pipelines.serve.proxy import CALLBACK, CALLBACK_ENV

    for name in (KEY_ENV, CALLBACK_ENV, "RAY_ADDRESS", "RERANK_RETRY_AFTER_S"):
        monkeypatch.delenv(name, raising=False)
    prepare_local_environment(_config("m", api_key="from-config"))
    assert os.environ[KEY_ENV] == "from-config"
    assert os.environ[CALLBACK_ENV] == CALLBACK
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(ConfigError, match=f"set {KEY_ENV} in the cluster's environment"):
        prepare_local_environment(_config("m", api_key="from-config"))


def _asgi(app, path: str, headers=()) -> tuple[int, dict, bytes, list]:
    """Run an ASGI app once; returns status, headers, body and the scope headers the app saw."""
    sent, seen = [], []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def run():
        await app({"type": "http", "path": path, "headers": list(headers), "method": "GET"}, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, seen


def test_proxy_middleware_answers_503_for_lost_replicas():
    """Unit test of the proxy middleware: a request the proxy ends without a response (a replica lost mid-request)
    becomes 503 + Retry-After; the proxy's 408 on /health (no replica in time) becomes 503; /health gets a short
    timeout header; anything else passes through untouched."""
    import json

    from pipelines.serve.proxy import ReplicaLossMiddleware

    scopes = []

    def inner(status: int | None, body: bytes = b"ok"):
        async def app(scope, receive, send):
            scopes.append(scope)
            if status is not None:
                await send({"type": "http.response.start", "status": status, "headers": []})
                await send({"type": "http.response.body", "body": body})

        return app

    async def raising(scope, receive, send):
        raise RuntimeError("ActorDiedError")

    lost = _asgi(ReplicaLossMiddleware(inner(None), retry_after_s=3), "/v2/rerank")
    assert lost[0] == 503 and lost[1]["retry-after"] == "3"
    assert json.loads(lost[2])["error_type"] == "unavailable"
    assert _asgi(ReplicaLossMiddleware(raising), "/v1/rerank")[0] == 503
    health = _asgi(ReplicaLossMiddleware(inner(408, b"timed out"), health_timeout_s=2), "/health")
    assert health[0] == 503 and json.loads(health[2])["status"] == "unavailable"
    assert (b"x-request-timeout-seconds", b"2") in scopes[-1]["headers"]
    own = [(b"x-request-timeout-seconds", b"9")]
    _asgi(ReplicaLossMiddleware(inner(200), health_timeout_s=2), "/svc/health", own)
    assert scopes[-1]["headers"] == own  # the client's own timeout wins
    assert _asgi(ReplicaLossMiddleware(inner(408)), "/v2/rerank")[0] == 408  # only /health's timeout is rewritten
    ok = _asgi(ReplicaLossMiddleware(inner(200, b"fine")), "/v2/rerank")
    assert ok[0] == 200 and ok[2] == b"fine"


def test_health_check_fails_on_a_broken_model(model_path, monkeypatch):
    """The replica class outside Serve: its health check probes the model when idle and raises once the model is
    broken; /health then answers 503."""
    from pipelines.serve.app import RerankService

    monkeypatch.setenv(KEY_ENV, KEY)
    wrapper = RerankService.func_or_class  # Serve's ingress wrapper (async __init__) around our class
    ours = wrapper.__mro__[1]
    replica = object.__new__(ours)
    ours.__init__(replica, _config(model_path, health_check_period_s=1).model_dump(mode="json", exclude_unset=True))

    async def check():
        await replica.check_health()
        return await replica.health()

    replica._last_ok -= 10  # idle past the period: the check runs a probe
    assert asyncio.run(check())["status"] == "ok"

    def broken(queries, passages):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    replica._model_outputs = broken
    replica._last_ok -= 10
    with pytest.raises(RuntimeError, match="model probe failed: RuntimeError: CUDA error"):
        asyncio.run(replica.check_health())
    res = asyncio.run(replica.health())
    assert res.status_code == 503 and b"CUDA error" in res.body
    # A replica built in this process (KEY in its environment) leaves nothing of the key on the FastAPI app,
    # which Serve pickles by value with the deployment class.
    from pipelines.serve.app import build_app_from_config

    d = build_app_from_config(_config(model_path))._bound_deployment
    assert KEY.encode() not in d._replica_config.serialized_deployment_def


# ---------------------------------------------------------------------------------------------- in-process Ray


@pytest.fixture(scope="module")
def service(model_path):
    """Ray started after the key and the proxy middleware are in the environment, as `rerank serve` does."""
    import ray
    from ray import serve

    from pipelines.serve import prepare_local_environment, start_service
    from pipelines.serve.proxy import CALLBACK_ENV, HEALTH_TIMEOUT_ENV, RETRY_AFTER_ENV

    port = free_port()
    config = _config(
        model_path,
        port=port,
        app_name="rerank-faults",
        num_cpus_per_replica=0.5,
        max_batch_pairs=16,
        request_timeout_s=REQUEST_TIMEOUT_S,
        health_check_period_s=2,
        health_check_timeout_s=20,
        retry_after_s=1,
    )
    names = (KEY_ENV, CALLBACK_ENV, HEALTH_TIMEOUT_ENV, RETRY_AFTER_ENV, "PYTHONPATH")
    saved = {k: os.environ.get(k) for k in names}
    os.environ[KEY_ENV] = KEY
    os.environ[HEALTH_TIMEOUT_ENV] = "2"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)
    prepare_local_environment(config)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        handle = start_service(config)
        url = f"http://127.0.0.1:{port}"
        _wait_for(url, 90)
        yield url, handle
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/health not 200 after {timeout} s")


def _post(url: str, key: str | None = KEY, timeout: float = REQUEST_TIMEOUT_S + 30) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(
        f"{url}/v2/rerank", json={"query": QUERY, "documents": DOCS}, headers=headers, timeout=(5, timeout)
    )


@pytest.mark.timeout(120)
def test_api_key_enforced_and_absent_from_ray_metadata(service, model_path):
    import ray
    from ray import serve
    from ray.experimental import internal_kv
    from ray.serve._private.storage.kv_store import SERVE_INTERNAL_KV_NAMESPACE

    url, handle = service
    assert _post(url, key=None).status_code == 401
    assert _post(url, key="wrong").status_code == 401
    assert _post(url).status_code == 200
    assert requests.get(f"{url}/health", timeout=10).status_code == 200  # probes need no key
    assert handle.stats.remote().result(timeout_s=30)["auth"] == 1
    assert KEY not in repr(serve.status())
    # Everything Ray's control plane stores: Serve's checkpoints (deployment configs with init args and
    # runtime_env), job and actor metadata.
    assert ray.is_initialized()
    found, control = [], []
    for namespace in (None, "serve", b"serve", SERVE_INTERNAL_KV_NAMESPACE):
        try:
            keys = internal_kv._internal_kv_list(b"", namespace=namespace)
        except Exception:  # noqa: BLE001, S112 - a namespace that does not exist
            continue
        for k in keys:
            value = internal_kv._internal_kv_get(k, namespace=namespace) or b""
            if KEY.encode() in value or KEY.encode() in k:
                found.append((namespace, k))
            if model_path.encode() in value:  # the deployment's init args are there: the scan sees them
                control.append(k)
    assert not found, found
    assert control


@pytest.mark.timeout(300)
def test_replica_killed_under_load_recovers(service):
    """SIGKILL the replica's process while three clients send requests: each request ends in 200 or a retryable
    503/408 within the request timeout,
    /health answers 503 while no replica is up and 200 again after, and Serve restarts the replica on its own."""
    url, handle = service
    old_pid = handle.stats.remote().result(timeout_s=30)["pid"]
    stop = threading.Event()
    killed_at: list[float] = []
    results: list[tuple[float, float, object]] = []  # (start, elapsed, status code or exception)
    health: list[tuple[float, object]] = []
    lock = threading.Lock()

    def client():
        for _ in range(400):  # bounded, whatever happens
            if stop.is_set():
                return
            t0 = time.monotonic()
            try:
                outcome: object = _post(url).status_code
            except requests.RequestException as err:
                outcome = err
            with lock:
                results.append((t0, time.monotonic() - t0, outcome))
            if outcome != 200:
                time.sleep(0.2)

    def prober():
        for _ in range(1000):
            if stop.is_set():
                return
            t0 = time.monotonic()
            try:
                outcome: object = requests.get(f"{url}/health", timeout=(5, 30)).status_code
            except requests.RequestException as err:
                outcome = err
            with lock:
                health.append((t0, outcome))
            time.sleep(0.2)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    threads.append(threading.Thread(target=prober, daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 200
    try:
        while time.monotonic() < deadline and sum(r[2] == 200 for r in results) < 6:
            time.sleep(0.1)
        os.kill(old_pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

        def recovered() -> bool:
            after = [r for r in results if r[0] > killed_at[0] + 1]
            return sum(r[2] == 200 for r in after) >= 3 and any(
                t > killed_at[0] and h == 200 for t, h in health if t > killed_at[0] + 1
            )

        while time.monotonic() < deadline and not recovered():
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 40)
    kill = killed_at[0]
    codes = [r[2] for r in results]
    errors = [c for c in codes if not isinstance(c, int)]
    assert not errors, errors[:3]  # no hang (client timeout) and no dropped connection
    # 503: the proxy middleware's answer for requests the dead replica held (or backpressure); 408: a request
    # that waited for the new replica longer than serve.request_timeout_s (a slow restart). Both are retryable.
    assert set(codes) <= {200, 503, 408}, sorted(set(codes))
    assert max(r[1] for r in results) < REQUEST_TIMEOUT_S + 5
    assert recovered(), (sorted((round(r[0] - kill, 1), r[2]) for r in results)[-20:], health[-10:])
    new_pid = handle.stats.remote().result(timeout_s=60)["pid"]
    assert new_pid != old_pid
    statuses = [h for _, h in health]
    assert all(isinstance(h, int) for h in statuses), [h for h in statuses if not isinstance(h, int)][:3]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    during = [h for t, h in health if t > kill]
    assert 503 in during, during  # no replica for a while: the proxy said so
    assert during[-1] == 200
