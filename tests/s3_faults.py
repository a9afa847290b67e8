"""A fault-injecting HTTP proxy in front of moto's S3 server, for testing how storage survives flaky S3.

``FaultProxy`` is a threaded HTTP/1.1 server on 127.0.0.1 and a free port. It forwards every request to the
upstream S3 endpoint (moto's ``ThreadedMotoServer``) and returns its answer, unless a programmed rule matches the
request: then it answers in the rule's way instead, for the first ``times`` matching requests (or for every one).

Fault kinds (``FaultProxy.inject(kind, ...)``):

- ``"slowdown"``: 503 with S3's ``<Error><Code>SlowDown</Code>...`` XML body (throttling).
- ``"internal"``: 500 with ``<Code>InternalError</Code>`` XML.
- ``"reset"``: the request is read, then the TCP connection is closed with a RST (connection reset by peer).
- ``"delay"``: the answer is held back ``delay_s`` seconds (set it past the client's read timeout), then the
  request is forwarded as usual (the client has usually given up by then).

The schedule lives in the test process, so Ray workers (other processes) that talk to ``proxy.endpoint`` see the
same faults: point ``storage.endpoint_url`` (or ``AWS_ENDPOINT_URL`` before Ray starts) at it.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from tests.ports import free_port

KINDS = ("slowdown", "internal", "reset", "delay")

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>fault-proxy</RequestId><HostId>fault-proxy</HostId></Error>"
)
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
# Hop-by-hop headers are not forwarded; the body is always sent whole with a Content-Length.
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authenticate"}


@dataclass
class Fault:
    """One rule: ``kind`` for the first ``times`` requests matching ``method`` and ``path`` (None: any; ``times``
    None: every matching request, a persistent fault). ``path`` is a regex searched in the request path+query
    (e.g. ``r"/bucket/in/"`` or ``r"list-type=2"``). ``injected`` counts the requests it answered."""

    kind: str
    times: int | None = 1
    method: str | None = None
    path: str | None = None
    delay_s: float = 0.0
    injected: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.injected >= self.times:
            return False
        if self.method is not None and method.upper() != self.method.upper():
            return False
        return self.path is None or re.search(self.path, path) is not None


@dataclass
class Seen:
    """A request the proxy received, and what it did: ``"forwarded"`` or the fault kind."""

    method: str
    path: str
    action: str
    at: float = field(default_factory=time.monotonic)


class FaultProxy:
    """The proxy; start with ``start()`` (or use the ``s3_fault_proxy`` fixture), stop with ``stop()``.

    - ``endpoint``: ``http://127.0.0.1:PORT``, the S3 endpoint URL to give clients.
    - ``inject(kind, times=1, method=None, path=None, delay_s=0.0) -> Fault``: add a rule (rules are tried in
      order; the first that matches answers).
    - ``clear()``: drop every rule and the request log (``injected`` counts of old rules stay on them).
    - ``injected(kind=None) -> int``: faults injected so far (of one kind, or all), over the current rules.
    - ``seen``: list of ``Seen(method, path, action)``, every request since the last ``clear()``.
    """

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rules: list[Fault] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def inject(
        self,
        kind: str,
        times: int | None = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        delay_s: float = 0.0,
    ) -> Fault:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {KINDS}")
        if kind == "delay" and delay_s <= 0:
            raise ValueError("a delay fault needs delay_s > 0")
        rule = Fault(kind, times, method, path, delay_s)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.seen.clear()

    def injected(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(r.injected for r in self.rules if kind is None or r.kind == kind)

    def _decide(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.injected += 1
                    self.seen.append(Seen(method, path, rule.kind))
                    return rule
            self.seen.append(Seen(method, path, "forwarded"))
            return None


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format: str, *args) -> None:
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def _handle(self) -> None:
        body = self._body()
        rule = self.owner._decide(self.command, self.path)
        try:
            if rule is not None and rule.kind == "reset":
                self._reset()
                return
            if rule is not None and rule.kind in _ERRORS:
                self._error(*_ERRORS[rule.kind])
                return
            if rule is not None and rule.kind == "delay":
                time.sleep(rule.delay_s)
            self._forward(body)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()

    def _error(self, status: int, code: str, message: str) -> None:
        data = _ERROR_XML.format(code=code, message=message).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amz-request-id", "fault-proxy")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, body: bytes) -> None:
        conn = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            res = conn.getresponse()
            data = res.read()
        finally:
            conn.close()
        self.send_response(res.status, res.reason)
        for k, v in res.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        length = res.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.fixture(scope="module")
def s3_fault_proxy(s3_server):
    """A ``FaultProxy`` in front of the module's moto server (``s3_server``), started for the module.

    Usage::

        def test_x(s3_fault_proxy):
            proxy = s3_fault_proxy
            proxy.clear()                                   # rules and log from an earlier test
            proxy.inject("slowdown", times=2, method="GET", path=r"/bucket/in/")
            proxy.inject("reset", times=1, method="PUT")
            proxy.inject("internal", times=None)            # persistent: every request
            proxy.inject("delay", times=1, delay_s=5)       # past the client's read timeout
            ... storage.endpoint_url = proxy.endpoint ...  # or AWS_ENDPOINT_URL before Ray starts
            assert proxy.injected("slowdown") == 2

    Requests that match no rule reach moto unchanged; ``proxy.seen`` logs each request and what was done.
    The fixture clears the rules when the module ends; tests should ``clear()`` first.
    """
    proxy = FaultProxy(s3_server).start()
    try:
        yield proxy
    finally:
        proxy.clear()
        proxy.stop()
