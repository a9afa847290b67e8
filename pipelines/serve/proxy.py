"""An ASGI middleware for Ray Serve's HTTP proxy: what clients see while replicas die and restart, and while
`rerank serve` stops.

Serve's proxy answers a request whose replica died mid-request (SIGKILL, OOM, lost node) with a bare 500, and
holds ``/health`` until a replica comes back (the route lives on the replicas), so a load balancer's probe hangs
instead of failing; and ``serve.shutdown()`` kills the proxy at once, closing the connections of the requests in
flight without a response. This middleware, loaded into the proxy through Ray's documented hook
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=pipelines.serve.proxy:middlewares`` (an environment variable of the
proxy's process; ``rerank serve`` sets it before it starts a local Ray), changes three things:

- A request the proxy ends without any response (a replica lost mid-request) gets 503 + ``Retry-After`` and a
  JSON body ``{"error_type": "unavailable", ...}``: safe to retry, nothing was returned.
- ``GET /health`` waits at most ``RERANK_HEALTH_TIMEOUT_S`` seconds (default 5) for a replica (unless the client
  sends its own ``x-request-timeout-seconds``); no replica by then: 503 ``{"status": "unavailable"}``.
- The drain of `rerank serve` (local Ray only: ``RERANK_DRAIN_DIR``, a folder `rerank serve` creates before Ray
  starts). On SIGTERM it writes ``draining.json`` there with a deadline (now + ``serve.drain_timeout_s``); from then
  on each proxy answers every new request 503 + ``Retry-After`` ``{"error_type": "shutting_down", ...}`` (the body
  of every service error; ``/health`` too, so load balancers stop sending), lets the requests it already holds
  finish, and at the deadline answers those still without a response 503 as well. Each proxy reports its count of
  requests in flight in ``proxy-<pid>.json`` beside the flag; `rerank serve` stops Serve once every live proxy
  reports none (``ProxyDrain``, ``drain_proxies`` in ``pipelines.serve``).

Everything else passes through untouched. No Ray import here: the proxy already has it loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from typing import Any

log = logging.getLogger("ray.serve")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "pipelines.serve.proxy:middlewares"
HEALTH_TIMEOUT_ENV = "RERANK_HEALTH_TIMEOUT_S"
RETRY_AFTER_ENV = "RERANK_RETRY_AFTER_S"
DRAIN_DIR_ENV = "RERANK_DRAIN_DIR"
DRAIN_FLAG = "draining.json"
REPORT_PREFIX = "proxy-"
_TIMEOUT_HEADER = b"x-request-timeout-seconds"

SHUTTING_DOWN = "the service is shutting down and takes no new requests; retry (another replica, or after the restart)"
CUT = (
    "the service stopped before this request finished (serve.drain_timeout_s); nothing was returned, so retrying "
    "is safe"
)


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def _is_health(path: str) -> bool:
    return path.rstrip("/").endswith("/health")


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write a small JSON file atomically (a reader never sees half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _error_body(message: str, error_type: str, status: str) -> dict[str, Any]:
    """The body of every service error (``pipelines.serve.api.ApiError.body``), plus ``status`` for /health."""
    return {"status": status, "message": message, "error": message, "error_type": error_type}


class ProxyDrain:
    """One proxy process's part of `rerank serve`'s drain (see the module docstring): whether the flag is up and
    its deadline, the requests this proxy holds, and the report `rerank serve` waits on."""

    def __init__(self, folder: str, poll_s: float = 0.05):
        self.flag = os.path.join(folder, DRAIN_FLAG)
        self.report_path = os.path.join(folder, f"{REPORT_PREFIX}{os.getpid()}.json")
        self.poll_s = poll_s
        self.deadline: float | None = None  # wall clock (time.time()), set once the flag is seen
        self.in_flight = 0
        self.counts = {"finished": 0, "cut": 0, "refused": 0}  # since the flag was seen
        self.expired = asyncio.Event()  # set at the deadline (an Event binds to the loop that first waits on it)
        self._task: asyncio.Task | None = None
        self._reported: dict[str, Any] | None = None
        self._report_failed = False

    def start(self) -> None:
        """Register this proxy (a report saying it is not draining) and watch for the flag, once, in the running
        event loop."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self.report(force=True)
        self._task = loop.create_task(self._watch())

    def draining(self) -> bool:
        if self.deadline is None and os.path.exists(self.flag):
            try:
                self.deadline = float((read_json(self.flag) or {})["deadline"])
            except (TypeError, KeyError, ValueError):
                return False  # not readable: the next look
            log.info("rerank drain: new requests get 503 from now; the %d in flight may finish", self.in_flight)
        return self.deadline is not None

    async def _watch(self) -> None:
        while True:
            try:
                if self.draining():
                    if self.deadline is not None and time.time() >= self.deadline and not self.expired.is_set():
                        log.info("rerank drain: the deadline passed; %d request(s) in flight get 503", self.in_flight)
                        self.expired.set()
                    self.report()
            except Exception:  # the watcher must outlive any one failure
                log.warning("rerank drain: watching %s failed", self.flag, exc_info=True)
            await asyncio.sleep(self.poll_s)

    def report(self, force: bool = False) -> None:
        data = {"pid": os.getpid(), "draining": self.deadline is not None, "in_flight": self.in_flight, **self.counts}
        if data == self._reported and not force:
            return
        try:
            write_json(self.report_path, data)
        except OSError as err:  # the folder is gone: `rerank serve` is past waiting
            if not self._report_failed:
                log.warning("rerank drain: cannot write %s: %s", self.report_path, err)
            self._report_failed = True
            return
        self._reported = data


_DRAINS: dict[str, ProxyDrain] = {}


def _drain_for(folder: str | None) -> ProxyDrain | None:
    """One ProxyDrain per folder and process (the proxy may build its middleware more than once)."""
    if not folder:
        return None
    if folder not in _DRAINS:
        _DRAINS[folder] = ProxyDrain(folder)
    return _DRAINS[folder]


class ReplicaLossMiddleware:
    """See the module docstring. Pure ASGI (no response buffering, streaming passes through)."""

    def __init__(
        self,
        app: Any,
        health_timeout_s: float | None = None,
        retry_after_s: int | None = None,
        drain: ProxyDrain | None = None,
    ):
        self.app = app
        self.health_timeout_s = health_timeout_s or _env_float(HEALTH_TIMEOUT_ENV, 5.0)
        self.retry_after_s = retry_after_s if retry_after_s is not None else int(_env_float(RETRY_AFTER_ENV, 2))
        self.drain = drain if drain is not None else _drain_for(os.environ.get(DRAIN_DIR_ENV, "").strip())
        if self.drain is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: registered on the first request
                self.drain.start()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        drain = self.drain
        if drain is None:
            await self._forward(scope, receive, send)
            return
        drain.start()
        if drain.draining():
            drain.counts["refused"] += 1
            await self._unavailable(send, _error_body(SHUTTING_DOWN, "shutting_down", "shutting_down"))
            return
        drain.in_flight += 1
        cut = False
        try:
            cut = await self._forward_until_deadline(drain, scope, receive, send)
        finally:
            drain.in_flight -= 1
            if drain.deadline is not None:
                drain.counts["cut" if cut else "finished"] += 1

    async def _forward_until_deadline(self, drain: ProxyDrain, scope: dict, receive: Any, send: Any) -> bool:
        """Forward the request; if the drain's deadline comes before its response starts, answer 503 instead
        (True), dropping whatever the proxy sends for it afterwards."""
        started = closed = False

        async def _send(message: dict) -> None:
            nonlocal started
            if closed:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        inner = asyncio.ensure_future(self._forward(scope, receive, _send))
        expired = asyncio.ensure_future(drain.expired.wait())
        try:
            await asyncio.wait({inner, expired}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this request's own task cancelled (the client left, the server stops)
            inner.cancel()
            raise
        finally:
            expired.cancel()
        if inner.done() or started:  # answered, or its response is under way: let it end as it would have
            await inner
            return False
        closed = True
        inner.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await inner
        await self._unavailable(send, _error_body(CUT, "shutting_down", "shutting_down"))
        return True

    async def _forward(self, scope: dict, receive: Any, send: Any) -> None:
        health = _is_health(scope.get("path", ""))
        if health and not any(k.lower() == _TIMEOUT_HEADER for k, _ in scope.get("headers", [])):
            timeout = f"{self.health_timeout_s:g}".encode()
            scope = dict(scope, headers=[*scope.get("headers", []), (_TIMEOUT_HEADER, timeout)])
        started = False
        replaced = False

        async def _send(message: dict) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                # The proxy's own timeout (408, plain text) on /health: no replica answered in time.
                if health and message.get("status") == 408:
                    replaced = True
                    await self._unavailable(send, {"status": "unavailable", "message": "no healthy replica"})
                    return
            elif replaced:
                return
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception:
            if started:
                raise
            log.warning("request to %s failed in the proxy before any response", scope.get("path"), exc_info=True)
        if not started:
            await self._unavailable(
                send,
                _error_body("the replica serving this request was lost; retry", "unavailable", "unavailable"),
            )

    async def _unavailable(self, send: Any, body: dict) -> None:
        data = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    (b"retry-after", str(self.retry_after_s).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data, "more_body": False})


def middlewares() -> list:
    """The callback named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: Starlette middleware for the proxy."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLossMiddleware)]
