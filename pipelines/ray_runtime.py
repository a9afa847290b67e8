"""Ray start-up: the one place that starts a local Ray or joins a cluster. Entry points call `connect`;
library code only ever uses a Ray that is already running.

- ``RAY_ADDRESS`` set (``host:port``, ``ray://host:port`` or ``auto``): join that cluster. An address that answers
  nothing is a one-line error after a few seconds, not a hang.
- Unset: start a local Ray for this process, explicitly (``address="local"``), so a ``ray_current_cluster`` file
  left in Ray's temp folder by an earlier ``ray start`` (live or stale) is never picked up by accident. Every port
  it opens (GCS, raylet, object manager, workers, dashboard agent, metrics export, runtime-env agent) binds
  ``ray.host``, 127.0.0.1 by default (see `_loopback_only`).

Signals: `stop_on_signals` turns SIGINT and SIGTERM (what Kubernetes, systemd and ``ray job stop`` send) into
`Stopped`, a KeyboardInterrupt, in the main thread; `connect` puts those handlers back after ``ray.init`` (which
replaces SIGTERM's with its own, under a C++ handler that dumps a stack and aborts), and `shutdown` stops the
local Ray and waits until its processes are gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator

from pipelines.config import RayConfig
from pipelines.errors import RerankError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"


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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_only() -> None:
    """Keep a local Ray's node address on loopback. Given ``_node_ip_address="127.0.0.1"``, Ray 2.60 on Linux
    swaps it for the host's own address (``services.resolve_ip_for_localhost``: its multi-node rule, off only
    where ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is false), and every component follows the node address: the gRPC
    servers (GCS, raylet, object manager, workers, dashboard agent) then bind all interfaces and the agents, the
    metrics export among them, the host's address. With the rule off the address stays loopback and so does every
    listener. The variable is read when Ray is imported, so the constant is set too; the environment carries it
    to the processes Ray starts."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def loopback_worker_setup() -> None:
    """``worker_process_setup_hook`` of a loopback-only local Ray, run first in each of its worker processes: a
    gRPC server that Ray's Python code binds to every interface binds loopback instead. In Ray 2.60 that is Ray
    Serve's replica (its inter-deployment server on ``[::]:0``, whatever the node address); callers reach it
    at the node address, 127.0.0.1 here."""
    import sys

    from ray._common import tls_utils

    original = tls_utils.add_port_to_grpc_server
    if getattr(original, "_rerank_loopback", False):
        return

    def add_port(server, address: str):
        host, _, port = address.rpartition(":")
        if host in ("", "[::]", "0.0.0.0"):
            address = f"{LOOPBACK}:{port}"
        return original(server, address)

    add_port._rerank_loopback = True
    tls_utils.add_port_to_grpc_server = add_port
    for name in ("ray.serve._private.replica",):  # modules that imported the name before this ran
        module = sys.modules.get(name)
        if module is not None and getattr(module, "add_port_to_grpc_server", None) is original:
            module.add_port_to_grpc_server = add_port


def connect(ray_config: RayConfig | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray for this process (on ``ray.host``,
    127.0.0.1 by default). Python signal handlers set before the call (`stop_on_signals`) still hold after it.

    Returns True when this call started a local Ray (the caller owns it and may shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "").strip()
    handlers = _python_handlers()
    try:
        if joins_cluster():
            check_address(address)
            try:
                ray.init(address=address, log_to_driver=True)
            except ConnectionError as err:
                raise ClusterError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {err}") from None
            return False
        host = ray_config.host if ray_config else LOOPBACK
        loopback = is_loopback(host)
        if loopback:
            _loopback_only()
        ray.init(
            address="local",
            _node_ip_address=host,
            num_cpus=local_num_cpus(ray_config),
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env={"worker_process_setup_hook": f"{__name__}.loopback_worker_setup"} if loopback else None,
        )
        return True
    finally:
        _restore_handlers(handlers)


def shutdown(timeout_s: float = 15.0) -> None:
    """Disconnect from Ray; a local Ray this process started stops its processes. Then wait up to `timeout_s`
    for every process below this one (a local Ray's: GCS, raylet, workers, and the agents, which follow their
    raylet down on their own) and kill what is left, so that nothing outlives the command. For entry points,
    whose only child processes are Ray's."""
    import ray

    procs = _descendants()
    try:
        if ray.is_initialized():
            ray.shutdown()
    finally:
        _reap(procs, timeout_s)


def _descendants() -> list:
    try:
        import psutil  # Ray ships its own copy (ray/thirdparty_files), on sys.path once ray is imported

        return psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - only for the wait below
        return []


def _reap(procs: list, timeout_s: float) -> None:
    if not procs:
        return
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        log.warning("Ray process %d (%s) still running after shutdown; killing it", proc.pid, _name(proc))
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - for a log line
        return "?"


# ---------------------------------------------------------------------------------------------- signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM under `stop_on_signals`. A KeyboardInterrupt, so code that cleans up after Ctrl-C
    (``finally`` blocks, Ray's own waits) does the same for SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM raises `Stopped` in the main thread; later ones are ignored
    so that the stop that follows (actors killed, Ray shut down) runs to its end. Explicit handlers also undo an
    ignored SIGINT inherited by a process started in the background. Off the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame) -> None:
        if fired:
            log.info("already stopping; %s ignored", signal.Signals(signum).name)
            return
        fired.append(signum)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _python_handlers() -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: h for sig in STOP_SIGNALS if callable(h := signal.getsignal(sig))}


def _restore_handlers(handlers: dict[int, object]) -> None:
    """Set again, even when Python still reports them: ray.init installs a C-level handler for SIGTERM (Ray's
    failure handler: a stack dump, then an abort) beside replacing the Python one."""
    for sig, h in handlers.items():
        signal.signal(sig, h)
