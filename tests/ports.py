"""Ports for servers the tests start on 127.0.0.1."""

from __future__ import annotations

import random
import socket

# Outside the kernel's ephemeral range (32768+), from which Ray picks ports for its own agents and exporters
# while a test's server is starting, and outside Ray's worker ports (10002-19999): a port chosen here is not
# taken by Ray between the choice and the bind.
_RANGE = (20000, 32000)


def free_port() -> int:
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_RANGE[0]}-{_RANGE[1]}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
