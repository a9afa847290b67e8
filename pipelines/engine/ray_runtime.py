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
import math
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        try:
            ray.init(
                address="local",
                _node_ip_address=host,
                num_cpus=local_num_cpus(ray_config),
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
                runtime_env={"worker_process_setup_hook": f"{__name__}.loopback_worker_setup"} if loopback else None,
            )
        except SystemExit as exit_:
            # ray.init answers SIGTERM with sys.exit(15) while it starts: under stop_on_signals that is a stop.
            if exit_.code == signal.SIGTERM and handlers:
                raise Stopped(signal.SIGTERM) from None
            raise
        _start_reaper()
        return True
    finally:
        _restore_handlers(handlers)


def shutdown(timeout_s: float = 15.0) -> None:
    """Disconnect from Ray; a local Ray this process started stops its processes. Then wait up to `timeout_s`
    for every process below this one (a local Ray's: GCS, raylet, workers, and the agents, which follow their
    raylet down on their own) and kill what is left, so that nothing outlives the command. For entry points,
    whose only child processes are Ray's."""
    import ray

    _stop_reaper()
    procs = _descendants()
    handlers = _python_handlers()
    started = ray.is_initialized()
    try:
        if started:
            ray.shutdown()
    finally:
        # ray.shutdown leaves SIGTERM at its default action: a second signal while stopping would kill this
        # process before it says how far it got.
        _restore_handlers(handlers)
        # A Ray whose start-up was interrupted never stops by itself: no wait for it.
        _reap(procs, timeout_s if started else 0.0, quiet=not started)


_REAPER: list = []


def _start_reaper() -> None:
    """The watchdog that stops this local Ray if this process dies without shutting it down (SIGKILL)."""
    import subprocess
    import sys

    try:
        _REAPER.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipelines.engine.reaper", str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    except OSError as err:  # the job runs without it; only a SIGKILLed driver would leave Ray behind
        log.warning("cannot start the watchdog of the local Ray: %s", err)


def _stop_reaper() -> None:
    while _REAPER:
        proc = _REAPER.pop()
        proc.kill()
        proc.wait(timeout=5)


def _descendants() -> list:
    try:
        import psutil  # Ray ships its own copy (ray/thirdparty_files), on sys.path once ray is imported

        return psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - only for the wait below
        return []


def _reap(procs: list, timeout_s: float, quiet: bool = False) -> None:
    """Wait up to timeout_s for `procs` to end; stop the rest (SIGTERM, then SIGKILL 3 s later), logged in one
    line unless `quiet` (a start-up that was interrupted: nothing else would stop them)."""
    if not procs:
        return
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    if not alive:
        return
    if not quiet:
        names = ", ".join(sorted({_name(p) for p in alive}))
        log.warning("%d Ray process(es) still running after shutdown (%s); stopping them", len(alive), names)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - for a log line
        return "?"


# ---------------------------------------------------------------------------------------------- GPUs


def cluster_gpus() -> tuple[float, float]:
    """``(now, most)``: the GPUs of the Ray cluster's live nodes, and the most it can have: ``now`` or what its
    autoscaler can add from its node types, whichever is more (``math.inf`` where a node type has no upper bound).
    Whether a model stage wants GPUs is to be decided from ``most``: an autoscaling cluster whose GPU node types
    start at zero has ``now == 0`` until a GPU request makes its autoscaler add one. Ray must be initialised; this
    never starts it, and no missing or unreadable source raises (a debug log line says what was skipped).

    Sources, in this order; the first that names node types decides ``most``:

    1. The cluster config in the GCS (internal KV ``__autoscaler`` / ``__autoscaler_cluster_config``, an
       ``autoscaler_pb2.ClusterConfig``, read by ``ray._private.state.state.get_cluster_config()``): each node
       group's ``resources["GPU"] * max_count`` (``max_count`` -1: unbounded), capped by ``max_resources["GPU"]``
       where set. Ray Data and Ray Train read the same key. Ray 2.60's own autoscalers do not write it (v2's
       ``Autoscaler._report_cluster_config`` came later); a Ray that does, or a platform's autoscaler, is read here.
    2. The autoscaling config file of the autoscaler on this machine: the Ray autoscaler (v1 or v2 ``monitor.py``)
       runs on the head, started with ``--gcs-address=<this cluster's GCS>`` and ``--autoscaling-config=<path>`` (the
       cluster launcher: ``~/ray_bootstrap_config.yaml``, the config ``ray up`` bootstrapped, resources filled in),
       found by its command line (GCS port matched) among this machine's processes; read as YAML. Its
       ``available_node_types``: the head type's GPUs plus each worker type's ``resources.GPU * max_workers``
       (default: the top-level ``max_workers``, which also caps the worker count, filled GPU-richest first). This is
       what the cluster launcher and ``ray start --head --autoscaling-config`` give a driver on the head, where Ray
       Jobs run entrypoints by default. A monitor without a config file (a fixed-size cluster) gives nothing.
    3. Neither: ``most = now``. This is the case of a driver off the head node (e.g. a Ray Jobs entrypoint given
       resources, or Ray Client), and of KubeRay's autoscaler on Ray 2.60 (a sidecar container that builds its
       config from the RayCluster resource, invisible from here). What the v1 autoscaler publishes in the GCS
       (internal KV ``__autoscaling_status``: active/pending node type names, pending launches, the resources of
       pending nodes, current nodes' resources) names no node type's resources or bounds, so it is not used.

    Cost: ``ray.cluster_resources()`` and one internal-KV get; source 2 adds a scan of this machine's process list
    and a file read. Raises RuntimeError only when Ray is not initialised."""
    import ray

    if not ray.is_initialized():  # Ray's calls below would start a local Ray
        raise RuntimeError("cluster_gpus() needs Ray initialised (ray.init or pipelines.engine.ray_runtime.connect)")
    now = float(ray.cluster_resources().get("GPU", 0.0))
    most = _gcs_config_gpus()
    if most is None:
        most = _local_autoscaler_gpus()
    return now, (now if most is None else max(now, most))


def gpus_from_cluster_config(config: Any) -> float | None:
    """The most GPUs an ``autoscaler_pb2.ClusterConfig`` allows; None when it has no node groups."""
    if config is None or not len(config.node_group_configs):
        return None
    total = 0.0
    for group in config.node_group_configs:
        gpus, count = float(group.resources.get("GPU", 0)), int(group.max_count)
        if gpus <= 0 or count == 0:
            continue
        total = math.inf if count < 0 else total + gpus * count
    if "GPU" in config.max_resources:
        total = min(total, float(config.max_resources["GPU"]))
    return total


def gpus_from_autoscaling_config(config: dict[str, Any]) -> float | None:
    """The most GPUs a Ray autoscaling config (cluster launcher YAML) allows; None when it names no node types."""
    types = config.get("available_node_types") or {}
    if not isinstance(types, dict) or not types:
        return None
    head_type = config.get("head_node_type")
    cap = config.get("max_workers")
    remaining = math.inf if cap is None else float(cap)

    def gpus_of(spec: Any) -> float:
        resources = (spec or {}).get("resources") or {}
        return float(resources.get("GPU", 0) or 0)

    total = gpus_of(types.get(head_type)) if head_type in types else 0.0
    workers = [(gpus_of(spec), spec or {}) for name, spec in types.items() if name != head_type]
    for gpus, spec in sorted(workers, key=lambda w: -w[0]):
        if gpus <= 0 or remaining <= 0:
            continue
        n = spec.get("max_workers", cap)
        n = remaining if n is None else min(float(n), remaining)
        total += gpus * n
        remaining -= n
    return total


def _gcs_config_gpus() -> float | None:
    try:
        from ray._private.state import state

        return gpus_from_cluster_config(state.get_cluster_config())
    except Exception as err:  # noqa: BLE001 - a missing source is not an error
        log.debug("cluster config from the GCS not read: %s", err)
        return None


def _local_autoscaler_gpus() -> float | None:
    path = local_autoscaling_config_path()
    if path is None:
        return None
    try:
        import yaml

        config = yaml.safe_load(path.read_text())
        gpus = gpus_from_autoscaling_config(config) if isinstance(config, dict) else None
    except Exception as err:  # noqa: BLE001
        log.debug("autoscaling config %s not read: %s", path, err)
        return None
    log.debug("autoscaling config %s: at most %s GPUs", path, gpus)
    return gpus


_MONITORS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")


def local_autoscaling_config_path() -> Path | None:
    """The ``--autoscaling-config`` file of the Ray autoscaler on this machine that serves this process's cluster
    (its ``--gcs-address`` has this cluster's GCS port), or None."""
    try:
        import psutil  # Ray's own copy once ray is imported
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a local Ray
            return None
        port = str(ray.get_runtime_context().gcs_address).rpartition(":")[2]
    except Exception as err:  # noqa: BLE001 - e.g. Ray Client, no GCS address here
        log.debug("no GCS address to match an autoscaler to: %s", err)
        return None
    if not port.isdigit():
        return None
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if not any(part.replace(os.sep, "/").endswith(_MONITORS) for part in cmdline):
                continue
            args = dict(part[2:].split("=", 1) for part in cmdline if part.startswith("--") and "=" in part)
            if args.get("gcs-address", "").rpartition(":")[2] != port:
                continue
            config = args.get("autoscaling-config")
            if not config:
                return None
            path = Path(os.path.expanduser(config))
            return path if path.is_absolute() else Path(proc.cwd()) / path
        except (psutil.Error, OSError, ValueError):
            continue
    return None


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
    so that the stop that follows (actors killed, Ray shut down, the stop line) runs to its end. Explicit handlers
    also undo an ignored SIGINT inherited by a process started in the background. Off the main thread it does
    nothing.

    Ray's core worker sets SIGTERM back to its default action on some of its paths (ray.shutdown among them), and a
    supervisor that retries sends a second SIGTERM within a second: so after the first signal, both are ignored
    at the C level, and kept so by a thread until the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []
    keep_ignoring = threading.Event()

    def handler(signum: int, frame) -> None:
        if fired:
            log.info("already stopping; %s ignored", signal.Signals(signum).name)
            return
        fired.append(signum)
        _ignore_signals_until(keep_ignoring)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        keep_ignoring.set()
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ignore_signals_until(done: threading.Event, every_s: float = 0.02) -> None:
    """SIGINT and SIGTERM ignored at the C level (libc signal(2): allowed off the main thread, unlike
    signal.signal), re-asserted every `every_s` until `done` is set."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal.restype = ctypes.c_void_p
    except (OSError, AttributeError):  # no libc to call: the Python handler ignores what reaches it
        return
    ignore = ctypes.c_void_p(1)  # SIG_IGN

    def hold() -> None:
        while True:
            for sig in STOP_SIGNALS:
                libc.signal(int(sig), ignore)
            if done.wait(every_s):
                return

    for sig in STOP_SIGNALS:
        libc.signal(int(sig), ignore)
    threading.Thread(target=hold, name="rerank-ignore-signals", daemon=True).start()


def _python_handlers() -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: h for sig in STOP_SIGNALS if callable(h := signal.getsignal(sig))}


def _restore_handlers(handlers: dict[int, object]) -> None:
    """Set again, even when Python still reports them: ray.init installs a C-level handler for SIGTERM (Ray's
    failure handler: a stack dump, then an abort) beside replacing the Python one."""
    for sig, h in handlers.items():
        signal.signal(sig, h)
