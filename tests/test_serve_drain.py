"""`rerank serve` on SIGTERM: no new requests (503 + Retry-After in the body of every service error), the requests
in flight drained for up to serve.drain_timeout_s (then 503, never a connection closed without a response), exit 0
and no process left.

No-Ray tests first: the proxy middleware's drain (``pipelines.serve.proxy.ProxyDrain``) run as plain ASGI, and the
driver's wait on the proxies' reports (``pipelines.serve.drain_proxies``). Then `rerank serve` as a real process
with its own local Ray and a model that scores at a fixed rate (``tests.tiny_models.build_simulated_accelerator``),
SIGTERM sent while a burst of requests is in flight: once with a grace period that lets every one finish, once with
one that does not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from pipelines.config import ModelConfig, ServeAppConfig, validate_config
from tests.ports import free_port, port_open

ROOT = Path(__file__).resolve().parent.parent
ERROR_KEYS = {"message", "error", "error_type"}


# ---------------------------------------------------------------------------------------------- no Ray


def test_drain_timeout_is_a_documented_key_and_serves_graceful_shutdown():
    from pipelines.errors import ConfigError
    from pipelines.serve.app import deployment_options

    config = validate_config(ServeAppConfig, {"model": {"name_or_path": "m"}}, source="t")
    assert config.serve.drain_timeout_s == 30.0
    opts = deployment_options(config)
    assert opts["graceful_shutdown_timeout_s"] == 30.0 and 0 < opts["graceful_shutdown_wait_loop_s"] <= 2
    zero = validate_config(
        ServeAppConfig, {"model": {"name_or_path": "m"}, "serve": {"drain_timeout_s": 0}}, source="t"
    )
    assert deployment_options(zero)["graceful_shutdown_timeout_s"] == 0
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        validate_config(ServeAppConfig, {"model": {"name_or_path": "m"}, "serve": {"drain_timeout_s": -1}}, source="t")


class _Client:
    """One ASGI request through the middleware, its messages recorded."""

    def __init__(self, middleware, path: str = "/v2/rerank"):
        self.sent: list[dict] = []
        self.task = asyncio.ensure_future(middleware(self._scope(path), self._receive, self._send))

    @staticmethod
    def _scope(path: str) -> dict:
        return {"type": "http", "path": path, "headers": [], "method": "POST"}

    async def _receive(self):
        await asyncio.sleep(3600)  # the inner apps below never read the body

    async def _send(self, message):
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def _held_app(release: asyncio.Event, cancelled: list[str]):
    """An inner app (Serve's proxy) that answers 200 once `release` is set; records cancellations."""

    async def app(scope, receive, send):
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(scope["path"])
            # What a proxy may still try to send for a request it was told to drop: must not reach the client.
            await send({"type": "http.response.start", "status": 499, "headers": []})
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"scored"})

    return app


def _report(folder: Path) -> dict[str, Any]:
    (report,) = folder.glob("proxy-*.json")
    return json.loads(report.read_text())


def _flag(folder: Path, deadline_in_s: float) -> None:
    from pipelines.serve.proxy import DRAIN_FLAG, write_json

    write_json(str(folder / DRAIN_FLAG), {"deadline": time.time() + deadline_in_s})


def test_proxy_drain_refuses_new_requests_and_lets_those_in_flight_finish(tmp_path):
    from pipelines.serve.proxy import ProxyDrain, ReplicaLossMiddleware

    async def scenario():
        release, cancelled = asyncio.Event(), []
        drain = ProxyDrain(str(tmp_path), poll_s=0.01)
        mw = ReplicaLossMiddleware(_held_app(release, cancelled), retry_after_s=4, drain=drain)
        held = [_Client(mw) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert _report(tmp_path) == {"pid": os.getpid(), "draining": False, "in_flight": 0, **drain.counts}
        _flag(tmp_path, 30)
        await asyncio.sleep(0.05)
        assert _report(tmp_path)["draining"] and _report(tmp_path)["in_flight"] == 3
        late = [_Client(mw, path) for path in ("/v1/rerank", "/rerank", "/v1/ranking", "/health")]
        await asyncio.gather(*(c.task for c in late))
        for c in late:
            body = json.loads(c.body)
            assert c.status == 503 and c.headers["retry-after"] == "4", c.sent
            assert (
                ERROR_KEYS <= set(body) and body["error_type"] == "shutting_down" and body["error"] == body["message"]
            )
            assert body["status"] == "shutting_down"
        assert not any(c.task.done() for c in held)  # still waiting for their scores
        release.set()
        await asyncio.gather(*(c.task for c in held))
        assert [c.status for c in held] == [200] * 3 and all(c.body == b"scored" for c in held)
        await asyncio.sleep(0.05)
        assert _report(tmp_path) == {
            "pid": os.getpid(), "draining": True, "in_flight": 0, "finished": 3, "cut": 0, "refused": 4,
        }  # fmt: skip
        assert not cancelled

    asyncio.run(scenario())


def test_proxy_drain_answers_503_at_the_deadline(tmp_path):
    """At the deadline a request without a response gets 503 (its inner request cancelled, anything the proxy sends
    for it afterwards dropped); one whose response has started is left to end."""
    from pipelines.serve.proxy import CUT, ProxyDrain, ReplicaLossMiddleware

    async def scenario():
        release, cancelled = asyncio.Event(), []
        streaming_go = asyncio.Event()

        async def app(scope, receive, send):
            if scope["path"] == "/stream":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await streaming_go.wait()
                await send({"type": "http.response.body", "body": b"late but whole"})
                return
            await _held_app(release, cancelled)(scope, receive, send)

        drain = ProxyDrain(str(tmp_path), poll_s=0.01)
        mw = ReplicaLossMiddleware(app, retry_after_s=2, drain=drain)
        stuck = [_Client(mw, "/v2/rerank"), _Client(mw, "/v1/ranking")]
        stream = _Client(mw, "/stream")
        await asyncio.sleep(0.05)
        _flag(tmp_path, 0.3)
        await asyncio.gather(*(c.task for c in stuck))
        for c in stuck:
            body = json.loads(c.body)
            assert c.status == 503 and c.headers["retry-after"] == "2", c.sent
            assert [m["type"] for m in c.sent] == ["http.response.start", "http.response.body"]  # no 499 after it
            assert body["error_type"] == "shutting_down" and body["message"] == CUT and "drain_timeout_s" in CUT
        assert sorted(cancelled) == ["/v1/ranking", "/v2/rerank"]
        assert not stream.task.done()
        streaming_go.set()
        await stream.task
        assert stream.status == 200 and stream.body == b"late but whole"
        await asyncio.sleep(0.05)
        report = _report(tmp_path)
        assert (report["in_flight"], report["cut"], report["finished"]) == (0, 2, 1)

    asyncio.run(scenario())


def test_proxy_without_a_drain_folder_is_unchanged(monkeypatch):
    from pipelines.serve.proxy import DRAIN_DIR_ENV, ReplicaLossMiddleware

    monkeypatch.delenv(DRAIN_DIR_ENV, raising=False)
    assert ReplicaLossMiddleware(lambda *a: None).drain is None


def test_drain_proxies_waits_for_every_live_proxy(tmp_path):
    from pipelines.serve import drain_proxies
    from pipelines.serve.proxy import DRAIN_FLAG, write_json

    assert drain_proxies(str(tmp_path), 5, poll_s=0.01, say=lambda *a, **k: None) is None  # no middleware: no wait
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=False
    )
    write_json(str(tmp_path / f"proxy-{int(dead.stdout)}.json"), {"pid": int(dead.stdout), "draining": False})
    mine = str(tmp_path / f"proxy-{os.getpid()}.json")
    counts = {"finished": 0, "cut": 0, "refused": 0}
    write_json(mine, {"pid": os.getpid(), "draining": False, "in_flight": 2, **counts})
    said: list[str] = []

    def proxy():  # what the middleware's watcher does once it sees the flag, then as its requests end
        while not (tmp_path / DRAIN_FLAG).exists():
            time.sleep(0.01)
        assert json.loads((tmp_path / DRAIN_FLAG).read_text())["deadline"] > time.time() + 4
        write_json(mine, {"pid": os.getpid(), "draining": True, "in_flight": 2, **counts})
        time.sleep(0.3)
        write_json(mine, {"pid": os.getpid(), "draining": True, "in_flight": 0, **counts, "finished": 2})

    thread = threading.Thread(target=proxy)
    thread.start()
    start = time.monotonic()
    totals = drain_proxies(str(tmp_path), 5, poll_s=0.01, say=lambda *a, **k: said.append(a[0]))
    thread.join()
    assert 0.25 < time.monotonic() - start < 3  # waited for this proxy, not for the dead one
    assert totals == {"in_flight": 0, "finished": 2, "cut": 0, "refused": 0}
    assert said == [
        "rerank: stopping: new requests get 503; waiting up to 5 s (serve.drain_timeout_s) for the 2 in flight"
    ]


# ---------------------------------------------------------------------------------------------- rerank serve


QUERY = "what is the boundary layer of a supersonic wing"
WORDS = ("flow", "heat", "shock", "mach", "wing", "layer", "pressure", "wave", "rank", "data")
DOCS = ["the boundary layer of a wing", "heat transfer in a shock wave", "pressure flow", "ray data model"]
APIS = ["v1/rerank", "v2/rerank", "rerank", "v1/ranking"]


def _body(api: str, query: str) -> dict[str, Any]:
    if api in ("v1/rerank", "v2/rerank"):
        return {"model": "m", "query": query, "documents": DOCS}
    if api == "rerank":
        return {"query": query, "texts": DOCS, "raw_scores": True, "truncate": True}
    return {"model": "m", "query": {"text": query}, "passages": [{"text": d} for d in DOCS], "truncate": "END"}


def _scores(api: str, out: Any) -> np.ndarray:
    """Each document's raw score in input order (Cohere's relevance_score is the sigmoid of it)."""
    if api == "rerank":
        items, key = out, "score"
    elif api == "v1/ranking":
        items, key = out["rankings"], "logit"
    else:
        items, key = out["results"], "relevance_score"
    got = np.full(len(DOCS), np.nan)
    for x in items:
        got[x["index"]] = x[key]
    if api in ("v1/rerank", "v2/rerank"):
        got = np.log(got / (1.0 - got))  # back from the sigmoid
    return got


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """The slow model the service runs, and the same model fast (the scores are a hash of the tokens, not of the
    rate), for the expected scores."""
    from tests.tiny_models import build_simulated_accelerator

    root = tmp_path_factory.mktemp("drain-models")
    return (
        build_simulated_accelerator(root / "slow", pairs_per_s=PAIRS_PER_S),
        build_simulated_accelerator(root / "fast", pairs_per_s=1e6),
    )


PAIRS_PER_S = 40.0  # 60 requests x 4 documents: 6 s of scoring


@pytest.fixture
def ray_tmp():
    import tempfile

    import psutil

    path = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))  # socket paths have a length limit
    yield path
    for proc in psutil.process_iter(["cmdline"]):  # anything of ours left
        try:
            if any(str(path) in part for part in (proc.info["cmdline"] or [])):
                proc.kill()
        except psutil.Error:
            pass
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _serve(model: Path, port: int, ray_tmp: Path, drain_timeout_s: float) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "pipelines.cli", "serve", str(ROOT / "conf/serve.yaml"),
        "--set", f"model.name_or_path={model}", "--set", "model.trust_remote_code=true",
        "--set", "model.device=cpu", "--set", "model.backend=torch", "--set", "model.max_length=64",
        "--set", f"serve.port={port}", "--set", "serve.num_cpus_per_replica=0.5", "--set", "ray.num_cpus=2",
        "--set", "serve.max_batch_pairs=16", "--set", "serve.retry_after_s=3",
        "--set", f"serve.drain_timeout_s={drain_timeout_s}",
    ]  # fmt: skip
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"`rerank serve` exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}"
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/health not ready after {timeout} s")


def _burst(url: str, n: int) -> tuple[list[tuple[str, str]], list[cf.Future]]:
    """n concurrent requests over the four APIs, each with its own query; (api, query) and futures of
    (response or the exception, time answered)."""
    jobs = [(APIS[i % 4], f"{QUERY} {WORDS[i % 10]} {WORDS[i // 10]}") for i in range(n)]

    def call(job):
        api, query = job
        try:
            r = requests.post(f"{url}/{api}", json=_body(api, query), timeout=(5, 180))
        except requests.RequestException as err:  # a closed connection: what must not happen
            return err, time.monotonic()
        return r, time.monotonic()

    pool = cf.ThreadPoolExecutor(n)
    futures = [pool.submit(call, job) for job in jobs]
    pool.shutdown(wait=False)
    return jobs, futures


def _stop(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"`rerank serve` did not stop after SIGTERM: {out[-3000:]}") from None
    return out


def _expected(fast_model: Path, queries: list[str]) -> dict[str, np.ndarray]:
    from pipelines.model.scoring import Scorer

    scorer = Scorer(ModelConfig(name_or_path=str(fast_model), trust_remote_code=True, device="cpu", max_length=64))
    raw = scorer.score([q for q in queries for _ in DOCS], DOCS * len(queries))
    return {q: raw[i * len(DOCS) : (i + 1) * len(DOCS)] for i, q in enumerate(queries)}


def _check_answer(api: str, query: str, result: Any, expected: dict[str, np.ndarray]) -> int:
    """200 with the right scores, or 503 + Retry-After in the service's error body; returns the status."""
    assert isinstance(result, requests.Response), f"{api}: no response ({result!r})"
    if result.status_code == 200:
        assert np.allclose(_scores(api, result.json()), expected[query], atol=1e-4), (api, query, result.text)
        return 200
    assert result.status_code == 503, (api, result.status_code, result.text)
    body = result.json()
    assert ERROR_KEYS <= set(body) and body["error_type"] == "shutting_down", body
    assert result.headers["retry-after"] == "3"
    return 503


def _assert_no_process_left(pids: list[int]) -> None:
    import psutil

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not left:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes left after SIGTERM: {left}")


def _tree(proc: subprocess.Popen) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_drains_the_requests_in_flight(models, ray_tmp):
    """60 requests in flight (6 s of scoring) when SIGTERM comes, a grace period long enough for all: every one
    gets 200 with its scores; requests sent after the SIGTERM get 503 in each API; exit 0, nothing left, the port
    closed."""
    slow, fast = models
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(slow, port, ray_tmp, drain_timeout_s=90)
    try:
        _wait_ready(proc, url)
        pids = _tree(proc)
        jobs, futures = _burst(url, 60)
        time.sleep(1.0)  # all in the proxy, most waiting for the model
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # New requests: 503 from the moment the stop begins (a few ms after the signal), in every API.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and requests.get(f"{url}/health", timeout=5).status_code != 503:
            time.sleep(0.02)
        health = requests.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "shutting_down", health.text
        late = [requests.post(f"{url}/{api}", json=_body(api, QUERY), timeout=10) for api in APIS]
        assert sum(not f.done() for f in futures) > 10, "too few requests still in flight to show a drain"
        results = [f.result(timeout=200) for f in futures]
        out = _stop(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    for r in late:
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        assert r.json()["error_type"] == "shutting_down" and ERROR_KEYS <= set(r.json())
    expected = _expected(fast, [q for _, q in jobs])
    statuses = [_check_answer(api, q, r, expected) for (api, q), (r, _) in zip(jobs, results, strict=True)]
    assert statuses == [200] * 60, statuses
    assert sum(t > sigterm_at for _, t in results) > 10  # answered during the drain
    assert proc.returncode == 0, out[-3000:]
    assert "rerank: stopping: new requests get 503; waiting up to 90 s (serve.drain_timeout_s)" in out, out[-3000:]
    assert "answered 503 at the deadline" in out and "service stopped" in out, out[-3000:]
    _assert_no_process_left(pids)
    assert not port_open(port)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{url}/v2/rerank", json=_body("v2/rerank", QUERY), timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_answers_503_for_what_the_grace_period_did_not_cover(models, ray_tmp):
    """The same burst, a 2 s grace period: the requests scored within it get 200 with their scores, the rest 503
    (never a closed connection), and the stop goes on."""
    slow, fast = models
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(slow, port, ray_tmp, drain_timeout_s=2)
    try:
        _wait_ready(proc, url)
        pids = _tree(proc)
        jobs, futures = _burst(url, 60)
        time.sleep(1.0)
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=200) for f in futures]
        out = _stop(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    expected = _expected(fast, [q for _, q in jobs])
    statuses = [_check_answer(api, q, r, expected) for (api, q), (r, _) in zip(jobs, results, strict=True)]
    cut = [r for r, _ in results if r.status_code == 503]
    assert cut and all("drain_timeout_s" in r.json()["message"] for r in cut), statuses
    assert any(t > sigterm_at and r.status_code == 200 for r, t in results), statuses  # drained until the deadline
    assert max(t for _, t in results) - sigterm_at < 2 + 5  # cut at the deadline, not at request_timeout_s
    assert proc.returncode == 0, out[-3000:]
    assert f"{len(cut)} answered 503 at the deadline" in out, out[-3000:]
    _assert_no_process_left(pids)
    assert not port_open(port)
