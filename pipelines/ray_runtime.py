"""Ray start-up: the one place that starts a local Ray or joins a cluster. Entry points call `connect`;
library code only ever uses a Ray that is already running.

- ``RAY_ADDRESS`` set (``host:port``, ``ray://host:port`` or ``auto``): join that cluster. An address that answers
  nothing is a one-line error after a few seconds, not a hang.
- Unset: start a local Ray for this process, explicitly (``address="local"``), so a ``ray_current_cluster`` file
  left in Ray's temp folder by an earlier ``ray start`` (live or stale) is never picked up by accident.
"""

from __future__ import annotations

import logging
import os
import socket

from pipelines.config import RayConfig
from pipelines.errors import RerankError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


class ClusterError(RerankError):
    """The Ray cluster named by RAY_ADDRESS cannot be reached."""


def local_num_cpus(ray_config: RayConfig | None = None) -> int:
    """Logical CPUs of a local Ray: a few more than cores, so an actor pool holding every CPU cannot starve the
    read tasks feeding it (the job would hang on small machines)."""
    if ray_config and ray_config.num_cpus:
        return ray_config.num_cpus
    return (os.cpu_count() or 2) + 2


def joins_cluster() -> bool:
    """True when an entry point here would join a cluster (RAY_ADDRESS set) rather than start a local Ray: the
    actors then run on other machines, whose devices this process cannot see."""
    return bool(os.environ.get("RAY_ADDRESS", "").strip())


def check_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ClusterError unless something listens at a ``host:port`` / ``ray://host:port`` address."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"RAY_ADDRESS={address!r} is not an address Ray can join: use host:port (the head's GCS port, 6379 by "
            "default), ray://host:10001, or unset it to run on a local Ray"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterError(
            f"RAY_ADDRESS={address} does not answer ({err.strerror or err}); is the cluster up and the address "
            "right? Unset RAY_ADDRESS to run on a local Ray instead"
        ) from None


def connect(ray_config: RayConfig | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray for this process.

    Returns True when this call started a local Ray (the caller owns it and may shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if joins_cluster():
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            raise ClusterError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {err}") from None
        return False
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",  # a Ray for this process only: nothing listens beyond loopback
        num_cpus=local_num_cpus(ray_config),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )
    return True
