"""An ASGI middleware for Ray Serve's HTTP proxy: what clients see while replicas die and restart.

Serve's proxy answers a request whose replica died mid-request (SIGKILL, OOM, lost node) with a bare 500, and
holds ``/health`` until a replica comes back (the route lives on the replicas), so a load balancer's probe hangs
instead of failing. This middleware, loaded into the proxy through Ray's documented hook
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=pipelines.serve.proxy:middlewares`` (an environment variable of the
proxy's process; ``rerank serve`` sets it before it starts a local Ray), changes two things:

- A request the proxy ends without any response (a replica lost mid-request) gets 503 + ``Retry-After`` and a
  JSON body ``{"error_type": "unavailable", ...}``: safe to retry, nothing was returned.
- ``GET /health`` waits at most ``RERANK_HEALTH_TIMEOUT_S`` seconds (default 5) for a replica (unless the client
  sends its own ``x-request-timeout-seconds``); no replica by then: 503 ``{"status": "unavailable"}``.

Everything else passes through untouched. No Ray import here: the proxy already has it loaded.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("ray.serve")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "pipelines.serve.proxy:middlewares"
HEALTH_TIMEOUT_ENV = "RERANK_HEALTH_TIMEOUT_S"
RETRY_AFTER_ENV = "RERANK_RETRY_AFTER_S"
_TIMEOUT_HEADER = b"x-request-timeout-seconds"


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def _is_health(path: str) -> bool:
    return path.rstrip("/").endswith("/health")


class ReplicaLossMiddleware:
    """See the module docstring. Pure ASGI (no response buffering, streaming passes through)."""

    def __init__(self, app: Any, health_timeout_s: float | None = None, retry_after_s: int | None = None):
        self.app = app
        self.health_timeout_s = health_timeout_s or _env_float(HEALTH_TIMEOUT_ENV, 5.0)
        self.retry_after_s = retry_after_s if retry_after_s is not None else int(_env_float(RETRY_AFTER_ENV, 2))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
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
                {
                    "status": "unavailable",
                    "message": "the replica serving this request was lost; retry",
                    "error": "the replica serving this request was lost; retry",
                    "error_type": "unavailable",
                },
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
