"""The online reranking service on Ray Serve: `rerank serve conf/serve.yaml`.

One application answers the Cohere/Jina (``/v1/rerank``, ``/v2/rerank``), Hugging Face TEI (``/rerank``) and
NVIDIA NIM (``/v1/ranking``) rerank APIs with the batch job's ``Scorer`` (``pipelines.serve.app``); the wire
formats and score conventions live in ``pipelines.serve.api``.

- Locally: ``rerank serve conf/serve.yaml [--set serve.port=8080]`` starts Ray, binds ``serve.host:serve.port``
  and runs until Ctrl-C (or SIGTERM), then drains (new requests get 503 + Retry-After, those in flight may finish
  for up to ``serve.drain_timeout_s``; ``drain_proxies`` and ``pipelines.serve.proxy``) and shuts Serve (and the
  Ray it started) down.
- On a cluster: ``serve deploy conf/serve_deploy.yaml`` / ``serve run conf/serve_deploy.yaml``; the Serve
  config file names the builder ``pipelines.serve:build_app`` and passes the config tree as ``args``.

The API key never goes through Ray: each replica reads it from its own environment (``serve.api_key_env``,
default ``RERANK_API_KEY``), which a cluster sets from its secret store and a local Ray inherits from
``rerank serve``'s process. Faults: Serve restarts a lost replica; the proxy middleware in
``pipelines.serve.proxy`` answers 503 + Retry-After for requests it was serving and for ``/health`` meanwhile.

Ray Serve is imported lazily so that ``rerank --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pipelines.config import ServeAppConfig, apply_overrides, read_yaml, validate_config
from pipelines.errors import ConfigError, RerankError

log = logging.getLogger("rerank.serve")

__all__ = [
    "build_app",
    "check_exposure",
    "drain_proxies",
    "load_serve_config",
    "register_cli",
    "start_service",
    "stop_service",
]


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_serve_config(args: dict[str, Any] | None) -> ServeAppConfig:
    """Builder args -> config: an optional ``config`` YAML path, the tree itself (model, serve, ray) merged over
    it, then ``key.path: value`` args and ``overrides`` (a list of ``key.path=value`` strings, as for ``--set``)."""
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = args.pop("overrides", None) or []
    if isinstance(overrides, str):
        overrides = [overrides]
    # `serve run pipelines.serve:build_app config=conf/serve.yaml model.name_or_path=...` passes flat strings.
    overrides = [f"{k}={v}" for k, v in list(args.items()) if "." in k and args.pop(k) is not None] + list(overrides)
    data = read_yaml(path) if path else {}
    data = apply_overrides(_deep_merge(data, args), list(overrides))
    return validate_config(ServeAppConfig, data, source=str(path) if path else "serve application args")


def build_app(args: dict[str, Any] | None = None):
    """Ray Serve application builder: ``import_path: pipelines.serve:build_app`` with ``args: {model: ...,
    serve: ...}`` (or ``args: {config: conf/serve.yaml}``) in a Serve config file, or
    ``serve run pipelines.serve:build_app config=conf/serve.yaml``."""
    from pipelines.serve.app import build_app_from_config, resolve_api_key

    if isinstance(args, ServeAppConfig):  # from `rerank serve`, which checked serve.host already
        return build_app_from_config(args)
    config = load_serve_config(args)
    if config.serve.api_key:
        # The builder's args are the Serve config file's, which Ray stores and shows (`serve status`, dashboard).
        raise ConfigError(
            "serve.api_key in Serve application args would be stored in Ray's metadata: remove it and set "
            f"{config.serve.api_key_env} in the replicas' environment from your secret store (e.g. a Kubernetes Secret)"
        )
    # From a Serve config file: the proxy's host is http_options', unknown here.
    if not resolve_api_key(config) and not config.serve.allow_unauthenticated:
        log.warning(
            "no API key (%s unset): anyone who can reach Serve's HTTP proxy can use the service",
            config.serve.api_key_env,
        )
    return build_app_from_config(config)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServeAppConfig) -> None:
    """Refuse to listen beyond loopback without an API key, unless told the network is trusted."""
    from pipelines.serve.app import resolve_api_key

    s = config.serve
    if not _is_loopback(s.host) and not resolve_api_key(config) and not s.allow_unauthenticated:
        raise ConfigError(
            f"serve.host={s.host} would expose the service without an API key: set {s.api_key_env} in the "
            "environment, or serve.allow_unauthenticated: true if a gateway authenticates"
        )


def prepare_local_environment(config: ServeAppConfig) -> None:
    """Before a local Ray starts (its processes inherit this process's environment): put a deprecated
    serve.api_key into the variable the replicas read, and load the proxy middleware that answers 503 for lost
    replicas (``pipelines.serve.proxy``) unless the user named another callback."""
    from pipelines.serve.proxy import CALLBACK, CALLBACK_ENV, RETRY_AFTER_ENV

    s = config.serve
    joining = bool(os.environ.get("RAY_ADDRESS", "").strip())  # the cluster's processes are already running
    if s.api_key:
        if joining:
            raise ConfigError(
                "serve.api_key cannot reach the replicas of a cluster without being stored in Ray's metadata: "
                f"remove it and set {s.api_key_env} in the cluster's environment from your secret store"
            )
        log.warning("serve.api_key in a config file is deprecated: set %s in the environment instead", s.api_key_env)
        os.environ[s.api_key_env] = s.api_key
    if not joining:
        os.environ.setdefault(CALLBACK_ENV, CALLBACK)
        os.environ[RETRY_AFTER_ENV] = str(s.retry_after_s)  # this service's setting, not one left by another


def start_service(config: ServeAppConfig):
    """Start Serve's HTTP proxy on serve.host:serve.port and deploy the app; returns once replicas are ready.
    Ray must already be connected (entry points do that)."""
    from ray import serve

    from pipelines.model.backends import actor_device, check_model_on
    from pipelines.serve.app import model_configs, replica_gpus

    # On the replicas' device, known now that Ray runs: a head without GPUs may deploy float16 replicas on GPUs.
    for sub in model_configs(config).values():
        check_model_on(sub.model, actor_device(sub.model, replica_gpus(sub)))
    s = config.serve
    try:
        serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    except Exception as err:  # noqa: BLE001 - e.g. the port is taken: one line, not Ray's traceback
        raise RerankError(
            f"Serve's HTTP proxy could not start on {s.host}:{s.port} (serve.host, serve.port): {_last_line(err)}"
        ) from None
    try:
        return serve.run(build_app(config), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    except RuntimeError as err:
        if "Deploying application" not in str(err):
            raise
        raise RerankError(f"the service failed to start: {_deployment_failure(s.app_name)}") from None


def _last_line(err: BaseException) -> str:
    """An exception in one line: the last non-empty line of its text (a Ray task error carries the remote
    traceback, whose last line is the cause, e.g. ``RuntimeError: Failed to bind ...``), led by the exception's
    type unless that line already names one."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    head = lines[-1].split(": ", 1)[0]
    named = ": " in lines[-1] and head.replace(".", "").isidentifier() and head[:1].isupper()
    return lines[-1] if named else f"{type(err).__name__}: {lines[-1]}"


def _deployment_failure(app_name: str) -> str:
    """The replica's own error (e.g. a ConfigError from loading the model) out of Serve's status."""
    from ray import serve

    try:
        app = serve.status().applications[app_name]
    except Exception:  # noqa: BLE001 - the status is only for the message
        return "see the Ray Serve logs"
    messages = [d.message for d in app.deployments.values() if d.message] or [app.message]
    lines = [ln.strip() for m in messages for ln in m.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error: " in ln and not ln.startswith("RuntimeError: Traceback")]
    return errors[-1] if errors else (lines[-1] if lines else "see the Ray Serve logs")


def stop_service(config: ServeAppConfig, *, whole_serve: bool, deployed: bool = True) -> None:
    """Delete the app, if it was deployed: Serve lets each replica finish its requests for up to
    serve.drain_timeout_s (the deployment's graceful_shutdown_timeout_s) while the proxies still pass their
    responses on. With whole_serve, then stop Serve's controller and proxies too (a Ray this process started):
    ``serve.shutdown()`` alone kills the proxies at once, with the connections of the requests they hold."""
    from ray import serve

    if deployed:
        serve.delete(config.serve.app_name)
    if whole_serve:
        serve.shutdown()


def make_drain_dir() -> str:
    """The folder through which `rerank serve` tells the proxies of a local Ray to drain
    (``pipelines.serve.proxy``), put in the environment its Ray processes inherit: call before Ray starts."""
    from pipelines.serve.proxy import DRAIN_DIR_ENV

    folder = tempfile.mkdtemp(prefix="rerank-drain-")
    os.environ[DRAIN_DIR_ENV] = folder
    return folder


def _proxy_reports(folder: str) -> list[dict[str, Any]]:
    """The latest report of each live proxy process that registered in the drain folder."""
    from pipelines.serve.proxy import REPORT_PREFIX, read_json

    out = []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(REPORT_PREFIX) and name.endswith(".json")):
            continue
        data = read_json(os.path.join(folder, name))
        if data is None or not _alive(int(data.get("pid", -1))):
            continue  # a proxy that died (Serve restarts it) holds nothing
        out.append(data)
    return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drain_proxies(folder: str, timeout_s: float, poll_s: float = 0.05, say=print) -> dict[str, int] | None:
    """Tell the proxies of this machine's Serve (through `folder`, see ``pipelines.serve.proxy``) to answer new
    requests 503 + Retry-After, and wait until the requests they hold have been answered: by the replicas, or by the
    proxy with 503 once `timeout_s` has passed. Returns the totals (finished, cut, refused), or None when no proxy
    registered (the middleware is not loaded: nothing to wait for here)."""
    from pipelines.serve.proxy import DRAIN_FLAG, write_json

    deadline = time.time() + timeout_s
    write_json(os.path.join(folder, DRAIN_FLAG), {"deadline": deadline})
    give_up = time.monotonic() + timeout_s + 10.0  # a proxy that stopped reporting does not hold the stop forever
    announced = False
    while True:
        reports = _proxy_reports(folder)
        if not reports:
            return None
        totals = {k: sum(int(r.get(k, 0)) for r in reports) for k in ("in_flight", "finished", "cut", "refused")}
        drained = all(r.get("draining") for r in reports)
        if drained and not announced:
            announced = True
            say(
                f"rerank: stopping: new requests get 503; waiting up to {timeout_s:g} s (serve.drain_timeout_s) for "
                f"the {totals['in_flight']} in flight",
                flush=True,
            )
        if drained and totals["in_flight"] == 0:
            return totals
        if time.monotonic() > give_up:
            log.warning("the proxies did not report the end of the drain in time; stopping anyway")
            return totals
        time.sleep(poll_s)


def _replica_auth(handle: Any) -> bool:
    """Whether a replica enforces an API key (its own environment decides, not this process's)."""
    try:
        return bool(handle.stats.remote().result(timeout_s=30)["auth"])
    except Exception:  # noqa: BLE001 - only for the start-up line
        return False


def _metrics_url() -> str | None:
    """Where this node's Ray metrics agent exports Prometheus text (private Ray API, so best effort)."""
    try:
        import ray

        node = ray._private.worker._global_node
        return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    except Exception:  # noqa: BLE001 - only for a hint
        return None


def _connect(config: ServeAppConfig) -> bool:
    """`connect`, with a Ray that fails to start (an unwritable temp folder, a node address that is not this
    machine's, ...) in one line instead of Ray's traceback."""
    from pipelines.engine.ray_runtime import connect

    try:
        return connect(config.ray)
    except RerankError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever ray.init raised
        raise RerankError(f"Ray failed to start: {_last_line(err)}") from None


def _drain(config: ServeAppConfig, drain_dir: str | None) -> None:
    """After SIGTERM or Ctrl-C, before Serve stops: new requests get 503, those in flight get up to
    serve.drain_timeout_s to finish. On a cluster (no drain folder) Serve's own replica drain does it when the app
    is deleted (`stop_service`)."""
    s = config.serve
    if drain_dir is None:
        print(
            f"rerank: stopping: deleting the application; its replicas may finish their requests for up to "
            f"{s.drain_timeout_s:g} s (serve.drain_timeout_s)",
            flush=True,
        )
        return
    totals = drain_proxies(drain_dir, s.drain_timeout_s)
    if totals is None:
        log.warning("the proxy middleware (pipelines.serve.proxy) is not loaded: requests in flight are not drained")
    elif totals["finished"] or totals["cut"] or totals["refused"]:
        print(
            f"rerank: drained: {totals['finished']} request(s) in flight finished, {totals['cut']} answered 503 at the "
            f"deadline, {totals['refused']} new one(s) refused with 503",
            flush=True,
        )


def _run(args: argparse.Namespace) -> int:
    """`rerank serve`: until Ctrl-C or SIGTERM (Kubernetes, systemd), then new requests get 503 while those in flight
    finish (up to serve.drain_timeout_s), the app, Serve and a Ray this process started are stopped, every process
    of that Ray gone, exit 0. Signals that come during the stop are ignored."""
    import ray

    from pipelines.config import load_config
    from pipelines.engine.ray_runtime import joins_cluster, shutdown, stop_on_signals
    from pipelines.model.backends import check_model_config
    from pipelines.serve.proxy import DRAIN_DIR_ENV

    config = load_config(ServeAppConfig, args.config, args.overrides)
    check_exposure(config)
    from pipelines.serve.app import model_configs

    for sub in model_configs(config).values():  # an unsupported backend/dtype is refused before Ray starts
        check_model_config(sub.model, joins_cluster())
    prepare_local_environment(config)
    # Stop what we started: a local Ray (and all of Serve in it), or only our app on a shared cluster.
    owns_ray = False
    started = False
    joined = not ray.is_initialized()
    # The drain folder reaches the proxies of a Ray started here (they inherit this environment), not a cluster's.
    drain_dir = make_drain_dir() if joined and not joins_cluster() else None
    with stop_on_signals():  # kept across ray.init by connect()
        try:
            owns_ray = _connect(config)
            handle = start_service(config)
            started = True
            s = config.serve
            auth = "API key required" if _replica_auth(handle) else "no API key"
            prefix = s.route_prefix.rstrip("/")
            log.info("rerank service ready at http://%s:%d%s (%s); Ctrl-C stops it", s.host, s.port, prefix, auth)
            print(f"rerank: serving on http://{s.host}:{s.port}{prefix} ({auth}); Ctrl-C stops it", flush=True)
            metrics = _metrics_url()
            if metrics:
                print(f"rerank: Prometheus metrics (ray_rerank_*, ray_serve_*) at {metrics}", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (pipelines.engine.ray_runtime.Stopped)
            log.info("shutting down")
            if started:
                try:
                    _drain(config, drain_dir if owns_ray else None)
                except Exception as err:  # noqa: BLE001 - the stop goes on, in one line
                    log.warning("the drain failed (%s); stopping now", err)
        finally:
            try:
                if ray.is_initialized() and (started or owns_ray):
                    stop_service(config, whole_serve=owns_ray, deployed=started)
            finally:
                try:
                    if joined:
                        shutdown()  # a local Ray: down, and its processes gone
                finally:
                    if drain_dir is not None:
                        os.environ.pop(DRAIN_DIR_ENV, None)
                        shutil.rmtree(drain_dir, ignore_errors=True)
    print("rerank: service stopped", flush=True)
    return 0


def register_cli(
    commands: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]],
    add_config_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    commands["serve"] = (
        "start the online reranking service (Cohere, TEI and NIM rerank APIs) on Ray Serve",
        add_config_args,
        _run,
    )
