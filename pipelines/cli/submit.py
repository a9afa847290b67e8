"""`rerank submit`: run the batch job or the evaluation on a running Ray cluster through Ray's Jobs API.

    rerank submit conf/example_s3.yaml --address http://HEAD:8265 [--set k=v ...] [--resume] [--no-wait]

1. The config is validated here (unknown keys, bad values), and for the batch job the plan too (input listing and
   layout, corpus, model, output folder) when this machine can reach the storage (``--no-check`` skips the plan).
2. A ``working_dir`` is staged with only what the job needs: the ``pipelines`` package and the config file; no
   outputs, virtual environments, caches or ``.git``. The overrides go on the job's command line as they are.
3. The job is submitted with a readable id (``rerank-run-<config>-<UTC time>-<4 hex>``), the environment variables
   the job needs when they are set here (AWS endpoint, profile and region, HF offline mode and endpoint; secrets
   only when named with ``--env``, since a runtime_env is readable by anyone with access to the dashboard).
4. The logs are followed and the command exits with the job's status: 0 when it succeeded, the job's own exit
   code when it failed (2 for a user error found on the cluster). Ctrl-C asks whether to stop the job too
   (``--on-interrupt stop|detach`` decides without asking).

Ray's token authentication: with ``RAY_AUTH_MODE=token`` the token comes from ``RAY_AUTH_TOKEN``, the file named
by ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (Ray's own lookup). With ``RAY_AUTH_MODE`` unset, a cluster that
answers 401 is retried once with that token when one is found.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

from pipelines.config import EvalConfig, OutputConfig, RerankJobConfig, load_config, read_yaml
from pipelines.errors import ConfigError, RerankError

log = logging.getLogger("rerank.submit")

# Forwarded into the job's runtime_env when set on the client: what the job needs to reach S3 and the hub the way
# the client does. Profiles and regions must exist on the cluster's nodes too.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
)
# Never forwarded unless named with --env: a runtime_env is shown by the dashboard and `ray job list`.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "RAY_AUTH_TOKEN")
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY")

JOB_CONFIG_DIR = "submitted"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_WAIT_S = 60.0


class SubmitError(RerankError):
    """The job cannot be submitted as asked (cluster unreachable, authentication, a path the cluster cannot see)."""


# ---------------------------------------------------------------------------------------------- what to run


def detect_kind(config_path: str | Path) -> str:
    """'run' (the batch job) or 'eval', from the config's sections."""
    data = read_yaml(config_path)
    if "input" in data or "output" in data:
        return "run"
    eval_keys = {"data", "first_stage", "k_values", "n_grid", "n_base", "report", "cost", "quality_measure"}
    if eval_keys & data.keys():
        return "eval"
    raise ConfigError(
        f"{config_path}: cannot tell a batch job (input, output) from an evaluation (data, first_stage, report); "
        "say which with --job run or --job eval"
    )


def can_resume() -> bool:
    return "resume" in get_args(OutputConfig.model_fields["mode"].annotation)


def check_config(kind: str, config_path: str | Path, overrides: list[str], *, resume: bool, plan: bool) -> Any:
    """Validate the config (and the batch job's plan) on this machine; returns the config."""
    if kind == "eval":
        if resume:
            raise ConfigError("--resume is for the batch job; an evaluation always runs whole")
        from pipelines.evaluation.cascade import cascade_stages

        config = load_config(EvalConfig, config_path, overrides)
        models = {"model.name_or_path": config.model and config.model.name_or_path}
        for i, spec in enumerate(config.rerankers or []):  # every entry's model, and a cascade's own stage models
            if spec.model is not None:
                models[f"rerankers[{i}].model.name_or_path"] = spec.model.name_or_path
            for j, stage in enumerate(cascade_stages(spec, config.rerankers) if spec.cascade else []):
                if stage.reranker is None:
                    models[f"rerankers[{i}].cascade[{j}].model.name_or_path"] = stage.model.name_or_path
        models |= {
            "cost.tokenizer": config.cost.tokenizer,
            "first_stage.model.name_or_path": config.first_stage.model and config.first_stage.model.name_or_path,
        }
        _check_paths(_eval_paths(config), _model_paths(models))
        return config
    if resume:
        if not can_resume():
            raise ConfigError("--resume needs a batch job that can resume (output.mode: resume); update rerank")
        overrides = [*overrides, "output.mode=resume"]
    config = load_config(RerankJobConfig, config_path, overrides)
    if config.storage.has_credentials:  # the config file travels in the job's working_dir, readable on the cluster
        from pipelines.io.storage import credentials_to_environment

        credentials_to_environment(config.storage, joining_cluster=True)  # raises the one-line ConfigError
    uris = config.input.uri if isinstance(config.input.uri, list) else [config.input.uri]
    data = {f"input.uri[{i}]" if len(uris) > 1 else "input.uri": u for i, u in enumerate(uris)}
    data |= {"input.corpus_uri": config.input.corpus_uri, "output.uri": config.output.uri}
    if config.cascade is None:
        models = {"model.name_or_path": config.model.name_or_path}  # type: ignore[union-attr]
    else:
        models = {f"cascade[{i}].model.name_or_path": s.model.name_or_path for i, s in enumerate(config.cascade)}  # type: ignore[union-attr]
    _check_paths(data, _model_paths(models))
    if plan:
        from pipelines.job import plan_rerank
        from pipelines.job.cascade import plan_cascade

        try:  # the cluster's workers, not this machine, run the model
            (plan_rerank if config.cascade is None else plan_cascade)(config, on_cluster=True)
        except RerankError as err:
            raise type(err)(f"{err} (checked from this machine; --no-check submits without this check)") from None
    return config


def _eval_paths(config: EvalConfig) -> dict[str, str | None]:
    d = config.data
    return {
        "data.path": d.path,
        "data.corpus": d.corpus,
        "data.queries": d.queries,
        "data.qrels": d.qrels,
        "first_stage.run": config.first_stage.run,
        "report.dir": config.report.dir,
    }


def _model_paths(names: dict[str, str | None]) -> dict[str, str | None]:
    # A hub id looks like a relative path; only a folder that exists here is a local model.
    return {k: n for k, n in names.items() if n and Path(n).exists()}


def _is_url(path: str) -> bool:
    return "://" in path


def _check_paths(data: dict[str, str | None], models: dict[str, str | None]) -> None:
    """The job runs in a temporary working directory on the cluster: relative local paths would point into it."""
    for key, path in {**data, **models}.items():
        if not path or _is_url(path):
            continue
        if not Path(path).is_absolute():
            raise ConfigError(
                f"{key}={path} is a relative local path, which the job on the cluster would look for in its own "
                "working directory: use s3://... (or another URL), or an absolute path every node can read"
            )
        log.warning("%s=%s is a local path: every node of the cluster must see it (a shared filesystem)", key, path)


# ---------------------------------------------------------------------------------------------- the package


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in ("__pycache__", ".pytest_cache", ".mypy_cache") or n.endswith((".pyc", ".pyo"))}


def stage_working_dir(config_path: str | Path, dest: str | Path) -> Path:
    """Copy what the job needs into dest: the ``pipelines`` package (the code this client runs) and the config file
    as ``submitted/<name>``. Nothing else: no outputs, venvs, caches or .git. Returns the config's relative path."""
    import pipelines

    dest = Path(dest)
    shutil.copytree(Path(pipelines.__file__).resolve().parent, dest / "pipelines", ignore=_ignore)
    rel = Path(JOB_CONFIG_DIR) / Path(config_path).name
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_path, dest / rel)
    return rel


def entrypoint(kind: str, config_rel: str | Path, overrides: list[str], *, resume: bool) -> str:
    """The job's command: the same CLI as on a laptop, run from the uploaded working_dir."""
    args = ["python", "-m", "pipelines.cli", kind, str(config_rel), *[f"--set={o}" for o in overrides]]
    if resume:
        args.append("--resume")
    return shlex.join(args)


def forwarded_env(names: list[str] | None = None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """FORWARDED_ENV that are set here, plus every --env NAME (its value here) or NAME=VALUE."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    for item in names or []:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if not sep:
            if name not in environ:
                raise ConfigError(f"--env {name}: {name} is not set in this environment; use --env {name}=VALUE")
            value = environ[name]
        env[name] = value
        if name in SECRET_ENV or any(w in name.upper() for w in _SECRET_WORDS):
            log.warning("--env %s: the value is stored in the job's runtime_env, readable on the dashboard", name)
    return env


def submission_id(kind: str, config_path: str | Path, now: datetime | None = None) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", Path(config_path).stem.lower()).strip("-")[:40] or "job"
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return f"rerank-{kind}-{stem}-{stamp}-{secrets.token_hex(2)}"


# ---------------------------------------------------------------------------------------------- the cluster


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    address = address.strip().rstrip("/")
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        raise SubmitError(
            "say where the cluster's dashboard is: --address http://HEAD:8265 (or RAY_API_SERVER_ADDRESS); "
            "for a cluster launched with cluster.yaml run `ray dashboard cluster.yaml` and use http://127.0.0.1:8265"
        )
    if "://" not in address:
        address = "http://" + address
    return address


def _token_available() -> bool:
    try:
        from ray._raylet import AuthenticationTokenLoader

        return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))
    except Exception:  # noqa: BLE001 - private Ray API; without it we only lose the automatic retry
        return False


def _enable_token_auth() -> None:
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()  # RAY_AUTH_MODE=token for this process, and Ray's cached config refreshed


_AUTH_HELP = (
    "set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, in a file named by "
    "RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (copy it from the head node, or `ray get-auth-token` there)"
)


def make_client(address: str):
    """A JobSubmissionClient for address, with Ray's token when the cluster asks for one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError:
            if os.environ.get("RAY_AUTH_MODE") or not _token_available():
                raise
            log.info("the cluster asks for a token: retrying with RAY_AUTH_MODE=token")
            _enable_token_auth()
            return JobSubmissionClient(address)
    except AuthenticationError as err:
        detail = str(err).splitlines()[0]
        raise SubmitError(f"the Ray cluster at {address} refused the request ({detail}): {_AUTH_HELP}") from None
    except ConnectionError:
        raise SubmitError(
            f"nothing answers at {address}: is the cluster up and is this its dashboard (port 8265 by default)? "
            "Forward it first if needed (`ray dashboard cluster.yaml`, `kubectl port-forward svc/...-head-svc 8265`)"
        ) from None


def _check_versions(client: Any) -> None:
    import ray

    server = getattr(client, "_server_ray_version", None)
    if server and server != ray.__version__:
        log.warning(
            "the cluster runs Ray %s, this client %s: pin the same version on both (pyproject.toml, Dockerfile)",
            server,
            ray.__version__,
        )


# ---------------------------------------------------------------------------------------------- following


async def _tail(client: Any, sid: str) -> None:
    async for lines in client.tail_job_logs(sid):
        sys.stdout.write(lines)
        sys.stdout.flush()


def wait_terminal(client: Any, sid: str, timeout_s: float | None = None) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(sid).value)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(1.0)


def _ask_stop(sid: str) -> str:
    if not sys.stdin or not sys.stdin.isatty():
        return "detach"
    try:
        answer = input(f"\nrerank: stop job {sid} on the cluster too? [y/N] ")
    except (KeyboardInterrupt, EOFError):
        return "detach"
    return "stop" if answer.strip().lower() in ("y", "yes") else "detach"


def follow(client: Any, sid: str, address: str, on_interrupt: str) -> int:
    """Print the job's logs until it ends; returns its exit status. Ctrl-C stops it or leaves it running."""
    try:
        asyncio.run(_tail(client, sid))
        status = wait_terminal(client, sid)
    except KeyboardInterrupt:
        action = _ask_stop(sid) if on_interrupt == "ask" else on_interrupt
        if action == "stop":
            print(f"rerank: stopping job {sid}", file=sys.stderr, flush=True)
            client.stop_job(sid)
            status = wait_terminal(client, sid, STOP_WAIT_S)
            print(f"rerank: job {sid}: {status}", file=sys.stderr, flush=True)
        else:
            print(
                f"rerank: job {sid} keeps running; follow it with `ray job logs -f {sid} --address {address}`, "
                f"stop it with `ray job stop {sid} --address {address}`",
                file=sys.stderr,
                flush=True,
            )
        return 130
    return exit_status(client, sid, status)


def exit_status(client: Any, sid: str, status: str) -> int:
    if status == "SUCCEEDED":
        return 0
    info = client.get_job_info(sid)
    message = " ".join((info.message or "").split())[:400]
    print(f"rerank: job {sid} {status.lower()}: {message}", file=sys.stderr, flush=True)
    if status == "FAILED":
        return info.driver_exit_code if isinstance(info.driver_exit_code, int) and info.driver_exit_code > 0 else 1
    return 1


# ---------------------------------------------------------------------------------------------- the command


def submit(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    kind = args.job if args.job != "auto" else detect_kind(args.config)
    env = forwarded_env(args.env)
    check_config(kind, args.config, args.overrides, resume=args.resume, plan=not args.no_check)
    client = make_client(address)
    _check_versions(client)
    sid = args.submission_id or submission_id(kind, args.config)
    with tempfile.TemporaryDirectory(prefix="rerank-submit-") as staging:
        config_rel = stage_working_dir(args.config, staging)
        command = entrypoint(kind, config_rel, args.overrides, resume=args.resume)
        runtime_env: dict[str, Any] = {"working_dir": staging}
        if env:
            runtime_env["env_vars"] = env
        metadata = {"rerank_job": kind, "rerank_config": str(args.config)}
        try:
            sid = client.submit_job(
                entrypoint=command,
                submission_id=sid,
                runtime_env=runtime_env,
                metadata=metadata,
                entrypoint_num_cpus=args.entrypoint_num_cpus,
            )
        except RuntimeError as err:
            if "already" in str(err).lower():
                raise SubmitError(f"submission id {sid} is already used on this cluster: choose another") from None
            raise
    print(f"rerank: submitted {sid} to {address}: {command}", flush=True)
    if env:
        print(f"rerank: environment forwarded: {', '.join(sorted(env))}", flush=True)
    if args.no_wait:
        print(
            f"rerank: follow it with `ray job logs -f {sid} --address {address}`, "
            f"stop it with `ray job stop {sid} --address {address}`",
            flush=True,
        )
        return 0
    # Ctrl-C and SIGTERM raise KeyboardInterrupt wherever the main thread is: asyncio.run's own SIGINT handler
    # only cancels the log tail, and Ray's log stream can end quietly on that cancel (the job then ran on).
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return follow(client, sid, address, args.on_interrupt)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def submit_args(p: argparse.ArgumentParser, add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    add_config_args(p)
    p.add_argument(
        "--address",
        help="the cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)",
    )
    p.add_argument(
        "--job",
        choices=("auto", "run", "eval"),
        default="auto",
        help="run (the batch job) or eval; auto tells them apart by the config's sections",
    )
    p.add_argument("--resume", action="store_true", help="continue an earlier run into the same output")
    p.add_argument("--no-wait", action="store_true", help="submit and return; do not follow the logs")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the input, model and output checks made from this machine (the config is still validated)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="also forward this environment variable to the job (repeatable); secrets only this way",
    )
    p.add_argument("--submission-id", help="the job's id (default: rerank-<job>-<config>-<UTC time>-<hex>)")
    p.add_argument(
        "--on-interrupt",
        choices=("ask", "stop", "detach"),
        default="ask",
        help="what Ctrl-C does to the job: ask (the default; detach when there is no terminal), stop it, or leave "
        "it running",
    )
    p.add_argument(
        "--entrypoint-num-cpus",
        type=float,
        default=None,
        help="CPUs reserved for the job's driver on the cluster (default: none reserved)",
    )


def register_cli(commands: dict, add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    commands["submit"] = (
        "submit the batch job or the evaluation to a running Ray cluster (Ray Jobs API) and follow it",
        lambda p: submit_args(p, add_config_args),
        submit,
    )
