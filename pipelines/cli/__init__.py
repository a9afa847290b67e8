"""`rerank` command line: run | demo | serve | eval | submit.

This module and jobs/ are the entry points: they alone start or connect to Ray. A user error (RerankError)
ends in one line on stderr and exit code 2, never a traceback. SIGTERM (Kubernetes, systemd, ``ray job stop``)
stops `rerank run` as Ctrl-C does: its actors and Ray stopped, one line saying how far it got, exit 143 (130
for SIGINT).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pipelines.engine.ray_runtime import Stopped, connect, shutdown, stop_on_signals
from pipelines.errors import RerankError

log = logging.getLogger("rerank")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "config", nargs=None if required else "?", help="YAML config file (see conf/ and docs/configuration.md)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override any config key, e.g. --set output.top_n=5 (repeatable)",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.config import RerankJobConfig, load_config
    from pipelines.engine.ray_runtime import joins_cluster
    from pipelines.io.storage import credentials_to_environment
    from pipelines.job import plan_and_hold, plan_rerank, run_rerank
    from pipelines.job.cascade import hold_cascade, plan_cascade

    overrides = args.overrides + (["output.mode=resume"] if args.resume else [])
    config = load_config(RerankJobConfig, args.config, overrides)
    # S3 keys in the config go to this process's environment (the local Ray inherits it), never to Ray.
    config.storage = credentials_to_environment(config.storage, joins_cluster())
    with stop_on_signals():  # from here: a stop during the plan or ray.init is a stop too
        plan = None
        joined = False
        try:
            # every input, model and output check before Ray starts (a cascade's: every stage's model)
            plan = plan_rerank(config) if config.cascade is None else plan_cascade(config)
            if plan.already_complete:
                print(f"rerank: {config.output.uri} is already complete (it has _SUCCESS); nothing to do", flush=True)
                return 0
            import ray

            joined = not ray.is_initialized()  # False when the caller's Ray is already up (tests, notebooks)
            # One job per output folder: a second run is refused before Ray starts.
            if config.cascade is None:
                plan, lease = plan_and_hold(config, plan)
            else:
                lease = hold_cascade(plan)
            if lease is None:  # a run that held the folder finished it while this one planned
                print(f"rerank: {config.output.uri} is already complete (it has _SUCCESS); nothing to do", flush=True)
                return 0
            try:
                connect(config.ray)
            except BaseException:
                lease.release()
                raise
            summary = run_rerank(config, plan, lease)  # it kills its actors on the way out, whatever the exception
            print(summary.one_line(), flush=True)
            return 0
        except Stopped as stop:
            if joined:
                shutdown()  # first, so that no unit commits after the count below
                joined = False
            print(f"rerank: {_stopped_at(plan)}", file=sys.stderr, flush=True)
            return stop.exit_code
        finally:
            if joined:
                shutdown()  # here rather than at interpreter exit, while the signal handlers are ours


def _stopped_at(plan) -> str:
    """How far a stopped job got, from its durable state (the manifest's units and the commit records), and what
    to do next; or, for a run whose output was taken over by another run, that it was (its state is the other
    run's: it is not counted as this one's)."""
    resume = "rerun with --resume to finish"
    if plan is None:
        return f"stopped before any unit was scored; {resume}"
    taken = _lease_lost(plan)
    if taken is not None:
        return taken
    try:
        if hasattr(plan, "describe_progress"):  # a cascade: how far its stages got
            return f"stopped ({plan.describe_progress()}); {resume}"
        progress = plan.progress
        units = (progress.read_manifest() or {}).get("units")
        if units is None:
            return f"stopped before any unit was scored; {resume}"
        return f"stopped after {len(progress.done_units()):,} of {len(units):,} units; {resume}"
    except Exception as err:  # noqa: BLE001 - the storage may be what failed; the hint stands without a count
        taken = _lease_lost(plan)
        if taken is not None:
            return taken
        log.debug("cannot count the finished units: %s", err)
        return f"stopped; {resume}"


def _lease_lost(plan) -> str | None:
    """The stop line of a run that lost its output's lease (another run took the folder over, or it was deleted),
    from what the lease found (no new read: the run has released it); None while the lease is this run's."""
    from pipelines.io.lease import LeaseLost

    lease = getattr(plan, "lease", None)
    if lease is None:
        return None
    try:
        lease.check()
        return None
    except LeaseLost as lost:
        why = getattr(lease, "_lost", None) or str(lost)
    after = "let it finish, or rerun with --resume once it has stopped"
    if why.startswith("another run took it over"):
        return f"stopped: the output was taken over by another run{why[len('another run took it over') :]}; {after}"
    return f"stopped: this run lost the output's lease ({why}); {after}"


def _run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run of this job in output.uri (same as --set output.mode=resume)",
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.cli.demo import run_demo

    with stop_on_signals():
        import ray

        joined = not ray.is_initialized()
        try:
            connect()
            return run_demo(args.output, args.overrides)
        finally:
            if joined:
                shutdown()


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def _register_builtin() -> None:
    def demo_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", default="rerank-output/demo", help="where to write the demo results")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    COMMANDS["run"] = ("rerank Parquet candidates with a model, top-N per query out", _run_args, _cmd_run)
    COMMANDS["demo"] = ("run the batch job on the bundled Cranfield data with the offline MiniLM", demo_args, _cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    if not COMMANDS:
        _register_builtin()
        _register_plugins()
    parser = argparse.ArgumentParser(prog="rerank", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def _register_plugins() -> None:
    """Subcommands that live beside their feature register themselves (their heavy imports stay lazy)."""
    from pipelines.cli.store import register_cli as register_store
    from pipelines.cli.submit import register_cli as register_submit
    from pipelines.evaluation import register_cli as register_eval
    from pipelines.serve import register_cli as register_serve

    register_serve(COMMANDS, _add_config_args)
    register_eval(COMMANDS, _add_config_args)
    register_submit(COMMANDS, _add_config_args)
    register_store(COMMANDS, _add_config_args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except RerankError as err:
        print(f"rerank: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:  # a command without its own handling of a stop
        print("rerank: stopped", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("rerank: interrupted", file=sys.stderr)
        return 130
