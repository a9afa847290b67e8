"""The batch job, wired: plan (``pipelines.job.plan``) -> the corpus join when asked (``join``) -> the units'
stages on Ray Data (``stages`` around the shared model stage, run by ``pipelines.engine.ray_data``) -> the reduce
(``reduce``) -> check and publish.

The scoring phase is one streaming Ray Data pipeline over the units still to do:

    chains of units -> read_units (CPU tasks: read, validate, tokenise) -> ModelStage (actor pool: GPU or CPU)
                    -> commit_units (CPU tasks: top-N per query, the unit's files and commit record)

The driver only folds the commit records that come back (counts, which units left files); it never holds the
data. Resume, retries and lost actors or nodes rest on the units: a unit counts once its commit record exists,
its files have names fixed by the unit, a retried stage rewrites the same bytes, and a record that comes back
twice is counted once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.config import RerankJobConfig
from pipelines.engine.model_stage import ModelStage
from pipelines.engine.pool import model_stage, resolve_pool
from pipelines.engine.ray_data import rerank_error, root_cause
from pipelines.errors import ConfigError, OutputError
from pipelines.io import rows as records
from pipelines.io.commit import COMPLETE, EMPTY, INCOMPLETE, SUCCESS
from pipelines.io.lease import Lease, LeaseLost
from pipelines.io.rows import PACKED
from pipelines.io.units import Unit, plan_units, read_footers
from pipelines.job.join import join_corpus, join_partitions, joined_layout
from pipelines.job.link import NO_LINK, CascadeLink
from pipelines.job.plan import MANIFEST_VERSION, JobPlan, OutputChanged, credentials_error, plan_and_hold, plan_rerank
from pipelines.job.reduce import reduce
from pipelines.job.stages import UnitSpec, chains_of, commit_units, read_units
from pipelines.job.store import open_store
from pipelines.job.summary import JobError, JobSummary, Totals

log = logging.getLogger(__name__)


def run_job(
    config: RerankJobConfig,
    plan: JobPlan | None = None,
    lease: Lease | None = None,
    link: CascadeLink = NO_LINK,
    before_publish: Callable[[JobSummary, JobPlan], None] | None = None,
) -> JobSummary:
    """Run (or resume) one reranking job of one model (`pipelines.job.run_rerank` runs a config's cascade or its
    model). Ray must already be initialised by the caller. `lease`: the output's lease from `hold_output`, when
    the caller took it already (released here either way). A cascade's stages (`pipelines.job.cascade`) pass
    their `link` and, on the last, a `before_publish` that completes the summary before it is published.

    S3 keys in ``config.storage`` are refused: Ray workers get credentials from their environment or the AWS
    credential chain, never as task or actor arguments (``rerank run`` moves keys from a config file into the
    environment of the local Ray it starts)."""
    if config.model is None:
        raise ConfigError("run_job runs one model; a config with a cascade runs through pipelines.job.run_rerank")
    started = time.perf_counter()
    try:
        if config.storage.has_credentials:
            raise ConfigError(credentials_error())
        plan = plan or plan_rerank(config)
        if plan.already_complete:
            recorded = plan.progress.read_summary() or {}
            log.info("rerank: %s is already complete; nothing to do", config.output.uri)
            return JobSummary.from_dict(recorded | {"output_uri": config.output.uri})
        return _run_planned(config, plan, lease, started, link, before_publish)
    finally:
        if lease is not None:
            lease.release()


def _run_planned(
    config: RerankJobConfig,
    plan: JobPlan,
    lease: Lease | None,
    started: float,
    link: CascadeLink,
    before_publish: Callable[[JobSummary, JobPlan], None] | None,
) -> JobSummary:
    # One job per output folder, from before the first write to the last: refused if another run holds it.
    scale = resolve_pool(config.model, config.scale)
    from pipelines.model import backends
    from pipelines.model.scoring import max_batch_tokens

    device = backends.actor_device(config.model, scale["num_gpus_per_actor"])
    backends.check_model_on(config.model, device)  # on the actors' device, before any of them starts
    model = plan.model | {"device": str(device), "max_batch_tokens": max_batch_tokens(config.model, device)}
    own = lease is None
    if own:
        plan, lease = plan_and_hold(config, plan)
        if lease is None:  # another run finished it meanwhile
            return JobSummary.from_dict((plan.progress.read_summary() or {}) | {"output_uri": config.output.uri})
    try:
        return _run_leased(config, plan, lease, started, scale, model, link, before_publish)
    finally:
        if own:
            lease.release()


def _run_leased(
    config: RerankJobConfig,
    plan: JobPlan,
    lease: Lease,
    started: float,
    scale: dict[str, Any],
    model: dict[str, Any],
    link: CascadeLink,
    before_publish: Callable[[JobSummary, JobPlan], None] | None,
) -> JobSummary:
    plan.lease = lease  # from here the plan's view of the output is this run's: nothing done there once it is lost
    progress = plan.progress
    if (
        config.output.mode != "overwrite"
        and plan.state != COMPLETE
        and progress.storage.exists(f"{plan.out_path}/{SUCCESS}")
    ):  # only an overwrite replaces a finished output's results (hold_output's check makes this unreachable)
        raise OutputChanged(f"output {config.output.uri} was finished by another run while this one started")
    if config.output.mode == "overwrite" and plan.state != EMPTY:
        progress.clear_all()  # only while this run still holds the lease, only inside the output, never an input

    manifest = progress.read_manifest() if plan.state == INCOMPLETE else None
    layout = plan.layout
    if manifest is None:
        partitions = join_partitions(config, sum(f.size for f in plan.files))
        manifest = {
            "version": MANIFEST_VERSION,
            "fingerprint": plan.fingerprint,
            "layout": records.layout_to_json(plan.layout),
            "join_partitions": partitions,
            "units": None,
        }
        progress.write_manifest(manifest)
    partitions = manifest["join_partitions"]

    unit_storage = plan.storage
    if manifest["units"] is None:
        if plan.corpus is not None:
            unit_storage, unit_files = join_corpus(config, plan, partitions)
            layout = joined_layout(layout)
            unit_footers = read_footers(unit_storage, unit_files)
        else:
            unit_footers = plan.footers if plan.footers is not None else read_footers(plan.storage, plan.files)
        units, _ = plan_units(unit_footers, layout, config.scale.unit_rows)
        manifest["units"] = [u.to_list() for u in units]
        manifest["unit_rows"] = config.scale.unit_rows  # what the units were cut with: a resume keeps them
        progress.write_manifest(manifest)
    else:
        units = [Unit.from_list(row) for row in manifest["units"]]
        if plan.corpus is not None:
            unit_storage, layout = plan.out_storage, joined_layout(layout)
    unit_rows = manifest.get("unit_rows")  # None: planned by an older rerank, which did not record it
    if unit_rows != config.scale.unit_rows:
        log.info(
            "rerank: the units were planned by the run that started this job, with scale.unit_rows %s; this run's "
            "%s does not apply to them",
            "(not recorded)" if unit_rows is None else unit_rows,
            config.scale.unit_rows,
        )

    done = progress.done_units()
    todo = [u for u in units if u.uid not in done]
    log.info(
        "rerank: %d input file(s), %s layout%s: %d unit(s), %d to score (%d done before); %d-%d actor(s) x %.2g CPU "
        "/ %.2g GPU",
        len(plan.files),
        layout.layout,
        " + corpus join" if plan.corpus else "",
        len(units),
        len(todo),
        len(units) - len(todo),
        scale["min_actors"],
        scale["max_actors"],
        scale["num_cpus_per_actor"],
        scale["num_gpus_per_actor"],
    )

    spec = UnitSpec(
        model=config.model,
        layout=layout,
        storage=config.storage,
        input_protocol_uri=unit_storage.uri(units[0].path) if units else config.output.uri,
        output_uri=config.output.uri,
        top_n=config.output.top_n,
        max_text_bytes=config.input.max_text_bytes,
        corpus=plan.corpus is not None,
        corpus_packed=plan.corpus is not None and plan.layout.layout == PACKED,
        lease_token=lease.token,
        link=link,
        score_store=open_store(config.output.score_store, config.storage, config.model, model["device"]),
    )
    timings: dict[str, float] = {"plan_s": time.perf_counter() - started}
    # Commit records: those of this run come back from the actors; only units done before it are read back.
    totals = Totals()
    for _, record in progress.read_done([u.uid for u in units if u.uid in done]):
        totals.add(record, now=False)
    if todo:
        _score(spec, todo, scale, config, timings, totals, lease)
    if totals.units != len(units):  # every unit commits exactly once, or the job says so (never silent loss)
        raise JobError(
            f"{len(units) - totals.units} of {len(units)} units came back without a commit record; rerun with "
            "--resume to score them"
        )

    recorded = config.model_dump(mode="json")
    recorded["scale"]["unit_rows"] = unit_rows  # what the units really are: the manifest's, not this run's setting
    summary = JobSummary(
        output_uri=config.output.uri,
        layout=plan.layout.layout + (" + corpus" if plan.corpus else ""),
        config=recorded,
        model=model,
        input_files=len(plan.files),
        units=len(units),
        units_resumed=len(units) - len(todo),
        units_retried=totals.units_retried,
        scale=scale
        | {
            "unit_rows": unit_rows,
            "units_by_node": dict(totals.units_by_node),
        },
    )
    if unit_rows != config.scale.unit_rows:
        summary.scale["unit_rows_set_now"] = config.scale.unit_rows  # this run's, which did not cut the units
    summary.fingerprint = plan.fingerprint
    if spec.score_store is not None:
        summary.score_store = {"uri": spec.score_store.uri, "namespace": spec.score_store.namespace} | totals.store
    lease.check(verify=True)  # a run that lost the output folder to another must not touch its results
    reduce_started = time.perf_counter()
    reduce(plan, layout, totals, summary, link)
    timings["reduce_s"] = time.perf_counter() - reduce_started
    summary.timings_s = {k: round(v, 3) for k, v in timings.items()}
    summary.wall_time_s = round(time.perf_counter() - started, 3)
    summary.pairs_per_s = round(totals.scored_now / summary.wall_time_s, 2) if summary.wall_time_s else 0.0
    if before_publish is not None:
        before_publish(summary, plan)
    progress.finish(summary.to_dict(), lease)
    return summary


def _stages(spec: UnitSpec, scale: dict[str, Any], config: RerankJobConfig) -> list:
    from pipelines.engine.ray_data import TaskStage

    retries = config.scale.unit_retries
    return [
        TaskStage(
            "read",
            read_units,
            {"spec": spec},
            num_cpus=scale["prepare_cpus"],
            concurrency=scale["prepare_concurrency"],
            retries=retries,
        ),
        model_stage(config.model, config.scale, scale),
        TaskStage("commit", commit_units, {"spec": spec}, num_cpus=scale["commit_cpus"], retries=retries),
    ]


def _score(
    spec: UnitSpec,
    units: list[Unit],
    scale: dict[str, Any],
    config: RerankJobConfig,
    timings: dict[str, float],
    totals: Totals,
    lease: Lease,
) -> None:
    """The scoring phase: the units' stages as one streaming Ray Data pipeline; commit records folded as they
    come back. A run that loses the output's lease stops: its commit tasks check it before they write (see
    `stages.commit_units`), and the driver at every record that comes back."""
    import ray
    import ray.data

    from pipelines.engine.ray_data import apply, data_context

    lease.check(verify=True)
    chains = chains_of(units)
    started, started_at = time.monotonic(), time.time()
    line = _ProgressLine(len(units), sum(u.rows for u in units), spec.layout.layout == PACKED, started)
    with (
        data_context(
            wait_for_min_actors_s=config.scale.actor_start_timeout_s,
            execution_no_progress_timeout_s=config.scale.stall_timeout_s,
            enable_progress_bars=sys.stderr.isatty(),
            max_errored_blocks=0,
        ),
        _ray_data_to_its_log_file(),
    ):
        ds = ray.data.from_items(
            [{"chain": json.dumps([u.to_list() for u in chain])} for chain in chains],
            override_num_blocks=len(chains),
        )
        # No more actors than chains to hand them (a pool above its work would hold idle model copies).
        pool = scale | {k: min(scale[k], len(chains)) for k in ("min_actors", "max_actors")}
        for stage in _stages(spec, pool, config):
            ds = apply(ds, stage)
        finished, pairs = 0, 0
        ticker = _Ticker(line, getattr(ds, "_uuid", None))
        ticker.start()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                now = time.monotonic()
                for text in batch.column("actor").to_pylist():
                    if text and "first_actor_s" not in timings:
                        actor = json.loads(text)
                        timings["first_actor_s"] = max(0.0, min(now - started, actor.pop("ready_at") - started_at))
                        timings.update(actor)
                        log.info(
                            "rerank: first model actor ready after %.1f s (imports %.1f s, model load %.1f s)",
                            timings["first_actor_s"],
                            actor["actor_imports_s"],
                            actor["model_load_s"],
                        )
                for text in batch.column("record").to_pylist():
                    record = json.loads(text)
                    if totals.add(record, now=True):
                        finished += 1
                        pairs += record["pairs_scored"]
                line.show(now, finished, pairs, last=finished == len(units))
                lease.check()  # lost: leave the loop, which stops the pipeline (see _counted)
        except Exception as err:  # noqa: BLE001 - ours re-raised as it is, Ray's named in one line
            alive = ticker.model_actors_alive()  # before anything else: what the pool looked like as it stopped
            ticker.stop()
            _point_to_ray_data_log()
            _raise_if_lost(lease, finished)  # the cause, whatever Ray kept of a commit task's error
            ours = rerank_error(err)
            if ours is not None:
                raise _counted(ours, finished) from None
            raise JobError(_scoring_failure(err, config, scale, finished, len(units), alive)) from None
        finally:
            ticker.stop()
    timings["scoring_s"] = time.monotonic() - started - timings.get("first_actor_s", 0.0)


def _raise_if_lost(lease: Lease, finished: int) -> None:
    """When the scoring stages fail, LeaseLost if the run lost its output (its commit tasks refuse to write then,
    and Ray does not always hand their error back)."""
    try:
        lease.check(verify=True)
    except LeaseLost as lost:
        raise _counted(lost, finished) from None
    except OutputError:  # the lease cannot be read now: the scoring failure says more
        pass


def _counted(err: Exception, finished: int) -> Exception:
    """A lost lease says how many units this run had committed before it stopped (none of them published)."""
    if isinstance(err, LeaseLost) and finished:
        return LeaseLost(f"{err} ({finished} unit(s) committed by this run before it stopped)")
    return err


def _scoring_failure(
    err: BaseException, config, scale: dict[str, Any], finished: int, total: int, alive: int | None = None
) -> str:
    """The one line for a failure of the scoring stages that is not ours. `alive`: model actors seen alive when
    the stages stopped (`_Ticker.model_actors_alive`; None: not known)."""
    import ray.exceptions

    kept = f"{finished} of {total} units done; rerun with --resume to keep them"
    if isinstance(err, ray.exceptions.GetTimeoutError) or "Timed out while starting actors" in str(err):
        lacks = _actor_needs(scale)
        return (
            f"no model actor started within {config.scale.actor_start_timeout_s:.0f} s: the cluster lacks {lacks} "
            f"(it has {scale['cluster_gpus']['now']:g} GPU(s) up, and can have {scale['cluster_gpus']['most']})"
        )
    if type(err).__name__ == "ExecutionTimeoutError" or "made no progress" in str(err):
        stall = config.scale.stall_timeout_s
        slow = (
            "a model or unit that hangs, or a unit slower than that: raise scale.stall_timeout_s or lower "
            "scale.unit_rows"
        )
        if alive:  # the actors were there: what they were given did not finish
            return f"no unit finished for {stall:.0f} s while the model actors were alive ({alive} up): {slow} ({kept})"
        lacks = _actor_needs(scale)
        if alive == 0:  # none alive: what the cluster lacks leads
            return (
                f"no unit moved for {stall:.0f} s (scale.stall_timeout_s): the model actors are gone and none could "
                f"be placed again (the cluster lacks {lacks}) ({kept})"
            )
        return (
            f"no unit moved for {stall:.0f} s (scale.stall_timeout_s): {slow}; or the model actors are gone and "
            f"none could be placed again (the cluster lacks {lacks}) ({kept})"
        )
    cause = ray_cause(err)
    if cause is not None:
        return f"the scoring actor could not start: {cause}"
    if type(err).__name__ in ("ActorDiedError", "ActorUnavailableError") or "ActorDiedError" in str(err):
        return (
            f"the model actors died and could not be restarted (scale.max_restarts {config.scale.max_restarts}) "
            f"({kept}): {root_cause(err)}"
        )
    return f"the scoring stages failed ({kept}): {root_cause(err)}"


def _actor_needs(scale: dict[str, Any]) -> str:
    """What one model actor reserves, for an error that says what the cluster lacked."""
    return (
        f"{scale['num_cpus_per_actor']:g} CPU / {scale['num_gpus_per_actor']:g} GPU"
        f"{' / ' + str(scale['actor_resources']) if scale['actor_resources'] else ''}"
        f"{' on ' + scale['accelerator_type'] + ' nodes' if scale['accelerator_type'] else ''} per model actor"
    )


def ray_cause(err: BaseException) -> str | None:
    """The model's own error when a model actor could not start (its constructor raised)."""
    text = str(err)
    if "__init__" in text or ("ActorDiedError" in text and "creation task" in text):
        return root_cause(err)
    return None


class _ProgressLine:
    """One log line every EVERY_S seconds while units are scored, whether or not a unit finished (`_Ticker`
    writes it; the driver's loop updates the counts): units and pairs done of the total, the rate since the first
    commit and an ETA; when no unit committed for EVERY_S or more, for how long, and where the work is (the
    stages' tasks and queues, the model actors up) when that can be seen. Also readable when the output is piped
    to a file (Ray Data's own progress bars show on a terminal)."""

    EVERY_S = 5.0

    def __init__(self, total_units: int, total_rows: int, packed: bool, started: float):
        self.total, self.rows, self.packed, self.started = total_units, total_rows, packed, started
        self.first: tuple[float, int, int] | None = None  # (time, units, pairs) at the first commit
        self.units, self.pairs = 0, 0
        self.moved_at = started  # when a unit last committed (or the scoring started)
        self.last_shown = started
        self._lock = threading.Lock()

    def show(self, now: float, units: int, pairs: int, last: bool = False) -> None:
        """The driver's counts after the commit records that came back: a line when one is due, and at the last."""
        with self._lock:
            if units > self.units:
                self.moved_at = now
            self.units, self.pairs = units, pairs
            if units and self.first is None:
                self.first = (now, units, pairs)
            if last or now - self.last_shown >= self.EVERY_S:
                self._log(now, None)

    def due(self, now: float) -> bool:
        return now - self.last_shown >= self.EVERY_S

    def tick(self, now: float, view: _StageView | None = None) -> None:
        """The ticker's line, when one is due: the counts as they are, committed or not."""
        with self._lock:
            if self.due(now):
                self._log(now, view)

    def _log(self, now: float, view: _StageView | None) -> None:
        self.last_shown = now
        units, pairs = self.units, self.pairs
        idle = now - self.moved_at
        where = f"; {view.describe()}" if view is not None else ""
        if self.first is None:
            log.info(
                "rerank: 0 of %d units done after %s; no unit committed yet%s",
                self.total,
                _duration(now - self.started),
                where,
            )
            return
        t0, u0, p0 = self.first
        if now - t0 < 1.0:  # the first commits are all there is: since the scoring started
            t0, u0, p0 = self.started, 0, 0
        rate = (pairs - p0) / (now - t0) if now > t0 else 0.0
        unit_rate = (units - u0) / (now - t0) if now > t0 else 0.0
        eta = f", ETA {_duration((self.total - units) / unit_rate)}" if unit_rate > 0 and units < self.total else ""
        of = "" if self.packed else f" of {self.rows:,}"
        stalled = (
            f"; no unit committed for {_duration(idle)}{where}" if idle >= self.EVERY_S and units < self.total else ""
        )
        log.info(
            "rerank: %d of %d units (%.0f%%), %s%s pairs scored, %s pairs/s%s%s",
            units,
            self.total,
            100.0 * units / max(self.total, 1),
            f"{pairs:,}",
            of,
            f"{rate:,.0f}",
            eta,
            stalled,
        )


@dataclass(frozen=True)
class _StageView:
    """A look at the running stages: per stage (read, model, commit) its tasks at work and the units queued at
    its input; the model actors up, starting and restarting (None where not seen)."""

    stages: tuple[tuple[str, int, int], ...]
    actors: tuple[int, int, int] | None

    def describe(self) -> str:
        busy = [
            f"{name} {running} at work" + (f" + {queued} queued" if queued else "")
            for name, running, queued in self.stages
            if running or queued
        ]
        text = f"in {', '.join(busy)}" if busy else ""
        if self.actors is not None:
            up, starting, restarting = self.actors
            more = "".join(f", {n} {what}" for n, what in ((starting, "starting"), (restarting, "restarting")) if n)
            text += f"{'; ' if text else ''}model actors: {up} up{more}"
        return text or "no stage has work"


#: The job's stages as Ray Data names its operators (MapBatches(<function or class>)).
_STAGE_NAMES = ((read_units.__name__, "read"), (ModelStage.__name__, "model"), (commit_units.__name__, "commit"))


def _executor_view(dataset_uuid: str | None) -> _StageView | None:
    """The stages as Ray Data's streaming executor of this dataset sees them now (its operators' active tasks and
    input queues, the model pool's actor counts): in-process reads of Ray Data's internals (Ray 2.60), so anything
    unexpected gives None (the line then says less). None too while the executor is not running: before the first
    model actor is up (it starts after) and once the stages have stopped."""
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return None
    for thread in threading.enumerate():  # the executor is a thread, named after its dataset, while it runs
        if not isinstance(thread, StreamingExecutor) or (dataset_uuid and dataset_uuid not in thread.name):
            continue
        stages, actors = [], None
        for op, state in list((getattr(thread, "_topology", None) or {}).items()):
            name = next((short for key, short in _STAGE_NAMES if key in op.name), None)
            if name is None:
                continue
            stages.append((name, int(op.num_active_tasks()), int(state.total_enqueued_input_blocks())))
            if name == "model":
                info = op.get_actor_info()
                actors = (int(info.running), int(info.pending), int(info.restarting))
        if stages:
            return _StageView(tuple(stages), actors)
    return None


def _gcs_actors() -> tuple[int, int, int] | None:
    """The model actors of this job (up, starting, restarting) from the GCS's actor table: what Ray itself knows
    of them (Ray Data's pool keeps counting an actor that died for good as running). None if it cannot be read.
    One small call; the dashboard's state API is not needed (a local Ray runs without it)."""
    try:
        import ray
        from ray._private import state

        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        up = starting = restarting = 0
        for actor in state.actors(job_id=job).values():
            if ModelStage.__name__ not in str(actor.get("ActorClassName", "")):
                continue
            status = str(actor.get("State", ""))
            up += status == "ALIVE"
            starting += status in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")
            restarting += status == "RESTARTING"
        return up, starting, restarting
    except Exception as err:  # noqa: BLE001 - a private API of Ray's: without it the line says less
        log.debug("cannot read the actor table: %s", err)
        return None


class _Ticker:
    """The scoring phase's progress thread (a daemon, started and stopped by `_score`): every POLL_S it looks at
    the stages (`_executor_view`: Ray Data's executor, in this process), and every `_ProgressLine.EVERY_S` it
    reads the model actors from Ray's actor table (`_gcs_actors`) and logs the progress line, committed units or
    not. What it saw last tells a stalled job's model actors alive from gone (`model_actors_alive`)."""

    POLL_S = 1.0

    def __init__(self, line: _ProgressLine, dataset_uuid: str | None):
        self.line, self.uuid = line, dataset_uuid
        self.executor_seen = False
        self.alive: int | None = None  # model actors up in Ray's actor table, read while the stages ran
        self.alive_at = 0.0
        self.pool_alive: int | None = None  # what Ray Data's pool counts (never fewer than are alive)
        self.pool_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rerank-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(min(self.POLL_S, self.line.EVERY_S)):
            try:
                now = time.monotonic()
                view = _executor_view(self.uuid)
                if view is not None:
                    self.executor_seen = True
                    if view.actors is not None:
                        self.pool_alive, self.pool_at = view.actors[0], now
                if self.line.due(now):
                    actors = _gcs_actors()
                    if actors is not None:
                        self._sampled(actors[0], now)
                        view = _StageView(view.stages if view is not None else (), actors)
                self.line.tick(now, view)
            except Exception as err:  # noqa: BLE001 - the line is a courtesy: the job goes on without it
                log.debug("progress line: %s", err)

    def _sampled(self, up: int, now: float) -> None:
        """A count of live model actors is kept only while the stages surely still ran when it was read (their
        executor still there after it: its end is what kills the actors), or when it shows some alive."""
        if (self.executor_seen and _executor_view(self.uuid) is not None) or up:
            self.alive, self.alive_at = up, now

    def model_actors_alive(self) -> int | None:
        """Model actors up as last seen while the stages ran (lately), None when that is not known: Ray's actor
        table first; else none when Ray Data's pool counted none."""
        now = time.monotonic()
        if self.alive is not None and now - self.alive_at <= 2 * self.line.EVERY_S + 1:
            return self.alive
        if self.pool_alive == 0 and now - self.pool_at <= 3 * self.POLL_S + 1:
            return 0
        return None


@contextlib.contextmanager
def _ray_data_to_its_log_file() -> Iterator[None]:
    """While the stages run, Ray Data's own lines go to its log file only (``ray-data*.log`` in the Ray session's
    logs), not the terminal: a failed unit's error, which Ray Data logs with its stack, becomes the job's one
    line; its start-up and execution-plan chatter are not for the user. Its warnings (say, resources the
    cluster lacks) still show. The console handlers are filtered, not removed, and restored on the way out."""
    logger = logging.getLogger("ray.data")
    console = [h for h in logger.handlers if not _writes_a_file(h)]
    for handler in console:
        handler.addFilter(_ray_data_console)
    try:
        yield
    finally:
        for handler in console:
            handler.removeFilter(_ray_data_console)


def _writes_a_file(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.FileHandler) or type(handler).__name__ == "SessionFileHandler"


def _ray_data_console(record: logging.LogRecord) -> bool:
    return (
        record.levelno == logging.WARNING
        and not record.exc_info
        and not record.getMessage().startswith("Progress bars disabled")  # we disable them off a terminal
    )


def _point_to_ray_data_log() -> None:
    """The scoring stages failed: where Ray Data's full report is (kept off the terminal)."""
    try:
        from ray.data._internal.logging import get_log_directory

        folder = get_log_directory()
    except Exception:  # noqa: BLE001 - a pointer only
        return
    if folder:
        log.info("rerank: Ray Data's full log of this run: %s", folder)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
