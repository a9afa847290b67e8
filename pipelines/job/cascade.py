"""Cascades in the batch job: `cascade: [{name, model, keep, scale}, ...]` instead of `model:`.

Each stage is a job of its own, run by ``run_rerank`` with the stage's model, actor pool and `keep` as its
top_n, so everything a job guarantees holds per stage (resume, lost actors and nodes, exact accounting):

    input -> stage 1 (all candidates)  -> <output>/_work/stages/01-<name>/   each query's top keep_1, with its
          -> stage 2 (what 1 kept)     -> <output>/_work/stages/02-<name>/   query and text carried along
          -> ...
          -> last stage (what the one before kept) -> <output>/   top output.top_n, the final score and rank

A stage's top keep is each query's global top: a stage is cut by its job's reduce, over all of the query's
units, before the next stage reads it. The last stage writes the output itself, under the lease the cascade
took on the output folder for the whole run; the earlier stages write inside that folder's `_work/` (their own
jobs, with their own leases there), which is deleted once the output is published. The output has, beside the
final `score` and `rank`, a `score_<stage>` column for every stage (the score that stage gave the candidate),
and `_rejects/` holds the rejects of every stage with a `stage` column. `_summary.json` has a `stages` list
(pairs in, scored, rejected, kept, time, per stage) and the cascade's fingerprint, which a `--resume` of the
finished output is checked against.

A resume runs the cascade again: a finished stage is found finished (its job's own resume check), an
unfinished one resumes, and only then does the next one start.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import RerankJobConfig
from pipelines.errors import ConfigError, OutputError, RerankError
from pipelines.io.commit import COMPLETE, EMPTY, REJECTS, WORK, Progress
from pipelines.io.lease import Lease, describe_holder, live_lease
from pipelines.io.storage import Storage
from pipelines.job.link import CascadeLink
from pipelines.job.plan import (
    SCORE_NEUTRAL,
    JobPlan,
    _check_overlaps,
    _check_results,
    _identities,
    _input_roots,
    _refuse_changed_job,
    comparable,
    credentials_error,
    inspect_corpus,
    inspect_input,
    plan_rerank,
    refuse_by_state,
)
from pipelines.job.run import run_job
from pipelines.job.summary import JobError, JobSummary

log = logging.getLogger(__name__)

STAGES = "stages"  # <output>/_work/stages/<NN>-<name>/: the earlier stages' jobs


def stage_folder(config: RerankJobConfig, index: int) -> str:
    """Where stage `index` (0-based, not the last) writes: inside the output's work folder."""
    stage = config.cascade[index]  # type: ignore[index]
    return f"{config.output.uri.rstrip('/')}/{WORK}/{STAGES}/{index + 1:02d}-{stage.name}"


def stage_config(config: RerankJobConfig, index: int) -> RerankJobConfig:
    """The job that runs stage `index`: its model and pool, the stage before's results as input (the first: the
    cascade's input), its `keep` as top_n (the last: output.top_n, into the output itself). Always in resume
    mode: the cascade decides about the output as a whole (an overwrite clears it once, before the first stage)."""
    stages = config.cascade or []
    stage = stages[index]
    last = index == len(stages) - 1
    data = config.model_dump(mode="python", exclude={"cascade"})
    data["model"] = stage.model.model_dump(mode="python")  # type: ignore[union-attr]
    if stage.scale is not None:  # the keys the stage sets, over the job's scale section
        data["scale"] = data["scale"] | stage.scale.model_dump(mode="python", include=stage.scale.model_fields_set)
    if index > 0:
        data["input"] = {"uri": stage_folder(config, index - 1), "max_text_bytes": config.input.max_text_bytes}
    data["output"] = data["output"] | {
        "uri": config.output.uri if last else stage_folder(config, index),
        "top_n": config.output.top_n if last else stage.keep,
        "mode": "resume",
    }
    return RerankJobConfig.model_validate(data)


def stage_link(config: RerankJobConfig, index: int) -> CascadeLink:
    """What stage `index` carries to its output: the texts the next stage reads (not the last), the scores of the
    stages before, its own score as score_<name>; its name on its rejects."""
    stages = config.cascade or []
    carry = [] if index == len(stages) - 1 else [("query", "query"), ("text", "text")]
    carry += [(f"score_{s.name}", f"score_{s.name}") for s in stages[:index]]
    return CascadeLink(tuple(carry), f"score_{stages[index].name}", stages[index].name)


def cascade_fingerprint(config: RerankJobConfig, revisions: list[Any], inputs: dict[str, str]) -> dict[str, Any]:
    """What shapes a cascade's output: every stage's score-relevant settings (`SCORE_NEUTRAL` left out, as for one
    job), the input, output.top_n and rows_per_file, the models' revisions and the input files' identities."""
    data = comparable(config.model_dump(mode="json", exclude={"cascade", "model"}))
    stages = {}  # by position and name, so that a refused resume names the setting: cascade.1-small.keep
    for i, (stage, revision) in enumerate(zip(config.cascade or [], revisions), 1):
        model = {k: v for k, v in stage.model.model_dump(mode="json").items() if k not in SCORE_NEUTRAL["model"]}  # type: ignore[union-attr]
        stages[f"{i}-{stage.name}"] = {"keep": stage.keep, "model": model, "model_revision": revision}
    data["cascade"] = stages
    data["input_files"] = dict(sorted(inputs.items()))
    return data


@dataclass
class CascadePlan:
    """A cascade checked before any cluster time is spent: the input (read once), every stage's model, the output."""

    config: RerankJobConfig
    out_storage: Storage
    out_path: str
    state: str
    fingerprint: dict[str, Any]
    models: list[dict[str, Any]]
    protected: list[str] = field(default_factory=list)
    lease: Lease | None = field(default=None, repr=False, compare=False)

    @property
    def progress(self) -> Progress:
        return Progress(self.out_storage, self.out_path, self.lease, self.protected)

    @property
    def already_complete(self) -> bool:
        return self.state == COMPLETE and self.config.output.mode == "resume"

    def describe_progress(self) -> str:
        """How far the stages got, for the line of a stopped run (from the stages' folders)."""
        done = []
        for i, stage in enumerate((self.config.cascade or [])[:-1]):
            folder = Storage.for_uri(stage_folder(self.config, i), self.config.storage)
            state = Progress(folder, folder.path(stage_folder(self.config, i))).state()
            done.append(f"{stage.name} {'done' if state == COMPLETE else 'not done'}")
        return ", ".join(done)


def plan_cascade(config: RerankJobConfig, on_cluster: bool | None = None) -> CascadePlan:
    """Validate a cascade without Ray (the checks of `plan_rerank`, for the cascade's input and output and every
    stage's model): raises InputError / OutputError / ConfigError naming the problem."""
    from pipelines.engine.ray_runtime import joins_cluster
    from pipelines.model.scoring import describe_model

    if config.cascade is None:
        raise ConfigError("plan_cascade needs a config with a cascade")
    out_storage = Storage.for_uri(config.output.uri, config.storage)
    out_path = out_storage.path(config.output.uri)
    progress = Progress(out_storage, out_path)
    try:
        state = progress.state()
    except Exception as err:  # noqa: BLE001 - botocore's hierarchy, as for listing
        raise OutputError(f"cannot access output {config.output.uri}: {type(err).__name__}: {err}") from None
    first = stage_config(config, 0)
    storage, files, footers, layout = inspect_input(first)
    corpus = inspect_corpus(first, layout) if config.input.corpus_uri else None
    cluster = joins_cluster() if on_cluster is None else on_cluster
    models = []
    for stage in config.cascade:
        try:
            models.append(describe_model(stage.model, cluster))  # type: ignore[arg-type]
        except RerankError as err:
            raise type(err)(f"cascade stage {stage.name}: {err}") from None
    inputs = [("input", storage, _input_roots(storage, config.input.uri), [f.path for f in files])]
    if corpus:
        inputs.append(
            ("corpus", corpus[0], _input_roots(corpus[0], config.input.corpus_uri), [f.info.path for f in corpus[1]])
        )
    protected: list[str] = []
    for i in range(len(config.cascade)):  # the output against the inputs, and every stage's model folder
        protected += _check_overlaps(stage_config(config, i), out_storage, out_path, inputs if i == 0 else [])
    holder = live_lease(progress, config.output.lease_timeout_s) if state != EMPTY else None
    if holder is not None:
        timeout = config.output.lease_timeout_s
        raise OutputError(
            f"output {config.output.uri} is in use by another run ({describe_holder(holder, holder['age_s'], timeout)}"
            "); wait for it to finish, or stop it; one job writes one output folder at a time"
        )
    identities = _identities(storage, files, footers)
    if corpus:
        identities |= _identities(corpus[0], [f.info for f in corpus[1]], corpus[1])
    fingerprint = cascade_fingerprint(config, [m.get("revision") for m in models], identities)
    mode = config.output.mode
    refuse_by_state(config.output.uri, mode, state, lambda: "a cascade that did not finish")
    if mode == "resume" and state == COMPLETE:
        summary = progress.read_summary() or {}
        recorded = summary.get("fingerprint")
        if not recorded or "cascade" not in recorded:
            raise OutputError(
                f"cannot resume {config.output.uri}: its finished job was not this cascade (it records no cascade); "
                "use output.mode=overwrite to redo it, or pick a new output.uri"
            )
        _refuse_changed_job(config.output.uri, recorded, fingerprint, storage, True)
        _check_results(config.output.uri, progress, summary)
    else:
        out_storage.check_writable(out_path if state == EMPTY else f"{out_path}/{WORK}")
    return CascadePlan(config, out_storage, out_path, state, fingerprint, models, sorted(set(protected)))


def hold_cascade(plan: CascadePlan) -> Lease:
    """The output folder's lease for the whole cascade (refused with OutputError naming the holder if another run
    has it); `run_cascade` releases it."""
    lease = Lease(Progress(plan.out_storage, plan.out_path), plan.config.output.lease_timeout_s)
    lease.acquire(takeover=plan.config.output.mode in ("resume", "overwrite"))
    plan.lease = lease
    return lease


def run_rerank(
    config: RerankJobConfig, plan: JobPlan | CascadePlan | None = None, lease: Lease | None = None
) -> JobSummary:
    """Run (or resume) a batch job: its cascade (`run_cascade`) or its one model (`pipelines.job.run.run_job`).
    Ray must already be initialised by the caller. `plan` and `lease`: from `plan_rerank` and `hold_output`
    (`plan_cascade` and `hold_cascade` for a cascade) when the caller took them already; the lease is released
    here either way.

    S3 keys in ``config.storage`` are refused: Ray workers get credentials from their environment or the AWS
    credential chain, never as task or actor arguments."""
    if config.cascade is not None:
        return run_cascade(config, plan, lease)  # type: ignore[arg-type]
    return run_job(config, plan, lease)  # type: ignore[arg-type]


def run_cascade(config: RerankJobConfig, plan: CascadePlan | None = None, lease: Lease | None = None) -> JobSummary:
    """Run (or resume) a cascade, stage after stage; Ray must already be initialised by the caller. `lease`: the
    output's, from `hold_cascade` (released here either way)."""
    started = time.perf_counter()
    try:
        if config.storage.has_credentials:
            raise ConfigError(credentials_error())
        plan = plan or plan_cascade(config)
        if plan.already_complete:
            log.info("rerank: %s is already complete; nothing to do", config.output.uri)
            return JobSummary.from_dict((plan.progress.read_summary() or {}) | {"output_uri": config.output.uri})
        lease = lease or hold_cascade(plan)
        plan.lease = lease
        if config.output.mode == "overwrite" and plan.state != EMPTY:
            plan.progress.clear_all()  # the earlier stages' folders too: every stage starts over
        stages = config.cascade or []
        earlier: list[JobSummary] = []
        for i, stage in enumerate(stages[:-1]):
            sub = stage_config(config, i)
            log.info("rerank: cascade stage %d of %d (%s): %s", i + 1, len(stages), stage.name, sub.model.name_or_path)  # type: ignore[union-attr]
            lease.check(verify=True)
            earlier.append(run_rerank_stage(sub, stage_link(config, i)))
        last = stage_config(config, len(stages) - 1)
        log.info(
            "rerank: cascade stage %d of %d (%s): %s",
            len(stages),
            len(stages),
            stages[-1].name,
            last.model.name_or_path,  # type: ignore[union-attr]
        )
        lease.check(verify=True)
        held, lease = lease, None  # run_job releases it from here
        return run_job(
            last,
            plan_rerank(last, held=held),
            held,
            stage_link(config, len(stages) - 1),
            before_publish=lambda summary, last_plan: _complete_summary(config, plan, earlier, summary, started),
        )
    finally:
        if lease is not None:
            lease.release()


def run_rerank_stage(config: RerankJobConfig, link: CascadeLink) -> JobSummary:
    """One stage before the last: its own job in the output's work folder (finished before: found finished)."""
    return run_job(config, plan_rerank(config), None, link)


def _complete_summary(
    config: RerankJobConfig, plan: CascadePlan, earlier: list[JobSummary], summary: JobSummary, started: float
) -> None:
    """The last stage's summary made the cascade's, before it is published: the earlier stages' rejects copied
    into `_rejects/`, the counts of every stage, checked to chain (what a stage kept is what the next one got)."""
    stages = config.cascade or []
    out = plan.progress
    copied: dict[str, int] = {}
    for i, stage_summary in enumerate(earlier):
        folder = Storage.for_uri(stage_folder(config, i), config.storage)
        path = folder.path(stage_folder(config, i))
        for name, size in sorted(stage_summary.result_files.items()):
            if not name.startswith(f"{REJECTS}/"):
                continue
            data = folder.fs.cat_file(f"{path}/{name}")
            if len(data) != size:
                raise JobError(f"stage {stages[i].name}: {name} has {len(data):,} bytes, {size:,} recorded")
            target = f"{REJECTS}/stage-{i + 1:02d}-{stages[i].name}-{name.rsplit('/', 1)[-1]}"
            out.storage.write_bytes(f"{out.out}/{target}", data)
            copied[target] = len(data)
    per_stage = []
    for stage, s in zip(stages, [*earlier, summary]):
        per_stage.append(
            {
                "name": stage.name,
                "model": stage.model.name_or_path,  # type: ignore[union-attr]
                "keep": stage.keep if stage.keep is not None else config.output.top_n,
                "pairs_in": s.pairs_in,
                "pairs_scored": s.pairs_scored,
                "pairs_reused": s.pairs_reused,  # from output.score_store (the stage's model's namespace)
                "rejected": s.rejected,
                "rows_kept": s.rows_written,
                "wall_time_s": s.wall_time_s,
                "scoring_s": s.timings_s.get("scoring_s", 0.0),
                "pairs_per_s": s.pairs_per_s,
                "units": s.units,
                "units_resumed": s.units_resumed,
            }
        )
    problems = [
        f"stage {b['name']} got {b['pairs_in']:,} pairs but stage {a['name']} kept {a['rows_kept']:,}"
        for a, b in itertools.pairwise(per_stage)
        if a["rows_kept"] != b["pairs_in"]
    ]
    if problems:
        raise JobError(f"the cascade's accounting does not add up, so no _SUCCESS was written: {'; '.join(problems)}")
    reasons: collections.Counter = collections.Counter()
    for s in [*earlier, summary]:
        reasons.update(s.rejected_by_reason)
    summary.stages = per_stage
    summary.pairs_in = per_stage[0]["pairs_in"]
    summary.pairs_scored = sum(s["pairs_scored"] for s in per_stage)
    summary.pairs_reused = sum(s["pairs_reused"] for s in per_stage)
    summary.windows_scored = sum(s.windows_scored for s in [*earlier, summary])
    summary.rejected = sum(s["rejected"] for s in per_stage)
    summary.rejected_by_reason = dict(sorted(reasons.items()))
    summary.result_files = dict(sorted((summary.result_files | copied).items()))
    summary.config = config.model_dump(mode="json")
    summary.model = {"stages": plan.models}
    summary.fingerprint = plan.fingerprint
    summary.input_files = earlier[0].input_files if earlier else summary.input_files
    summary.layout = earlier[0].layout if earlier else summary.layout
    summary.wall_time_s = round(time.perf_counter() - started, 3)
    summary.pairs_per_s = round(summary.pairs_scored / summary.wall_time_s, 2) if summary.wall_time_s else 0.0
