"""Plan a job, without Ray: list the input files, read each one's footer once, check their layout, the model, the
corpus and the output; record what shapes the output (`job_fingerprint`) so a resume can be checked against it;
hold the output folder (one job per output, `hold_output`). The units of work are cut from the footers by
`pipelines.io.units.plan_units` when the job starts (`pipelines.job.run`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import RerankJobConfig, StorageConfig
from pipelines.errors import InputError, OutputError
from pipelines.io import rows as records
from pipelines.io.commit import (
    COMPLETE,
    EMPTY,
    FOREIGN,
    INCOMPLETE,
    SUCCESS,
    WORK,
    Progress,
    differences,
    input_changes,
)
from pipelines.io.lease import Lease, describe_holder, live_lease
from pipelines.io.rows import InputLayout
from pipelines.io.storage import FileInfo, Storage
from pipelines.io.units import Footer, identity, needs_footer_for_identity, read_footers

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: input files identified by content (S3 ETag; local size, mtime and footer hash)


def _identities(storage: Storage, files: list[FileInfo], footers: list[Footer] | None) -> dict[str, str]:
    """Each input file's content identity (see `reads.identity`), by path: what a resume compares."""
    return {f.path: identity(storage, f, footers[i] if footers else None) for i, f in enumerate(files)}


def inspect_input(
    config: RerankJobConfig, recorded: dict[str, Any] | None = None
) -> tuple[Storage, list[FileInfo], list[Footer] | None, InputLayout]:
    """List the input files, read each one's footer once and check that every one has the same usable layout.
    `recorded`: the manifest of the job being resumed, when its units are planned: if the listing shows every
    file unchanged (S3: size and ETag), no footer is read and the recorded layout stands (footers None)."""
    uris = config.input.uri if isinstance(config.input.uri, list) else [config.input.uri]
    storage = Storage.for_uri(uris[0], config.storage)
    if any(Storage.for_uri(u, config.storage).protocol != storage.protocol for u in uris):
        raise InputError("input.uri mixes storage schemes; give paths on one storage")
    files = storage.list_parquet(uris)
    if recorded is not None and not needs_footer_for_identity(storage):
        inputs = recorded.get("fingerprint", {}).get("input_files", {})
        listed = _identities(storage, files, None)
        if recorded.get("layout") and all(inputs.get(p) == ident for p, ident in listed.items()):
            return storage, files, None, records.layout_from_json(recorded["layout"])
    footers = read_footers(storage, files)
    paths = [f.info.path for f in footers]
    schemas = [f.schema for f in footers]
    corpus = config.input.corpus_uri is not None
    layout = records.detect_layout(schemas[0], storage.uri(paths[0]), corpus)
    for path, schema in zip(paths[1:], schemas[1:]):
        other = records.detect_layout(schema, storage.uri(path), corpus)
        if other != layout:
            raise InputError(
                f"{storage.uri(path)} does not match {storage.uri(paths[0])}: "
                f"{'; '.join(records.layout_differences(layout, other, storage.uri(paths[0]), storage.uri(path)))}; "
                "all input files must share one layout and column types"
            )
    return storage, files, footers, layout


def inspect_corpus(config: RerankJobConfig, layout: InputLayout) -> tuple[Storage, list[Footer]]:
    """Check the corpus files' columns from their footers. That no doc_id appears twice (a pair would join two
    texts) is checked where the corpus is read, by the join (`_join_corpus`), not on the driver."""
    storage = Storage.for_uri(config.input.corpus_uri, config.storage)
    footers = read_footers(storage, storage.list_parquet(config.input.corpus_uri))
    for footer in footers:
        records.check_corpus(footer.schema, storage.uri(footer.info.path), layout.doc_id_type)
    return storage, footers


#: Settings that cannot change a score or the output's content, left out of the fingerprint (and out of an older
#: record's, when compared), so a resume may change them: how many pairs a forward pass takes (model.batch_size,
#: model.max_batch_tokens: micro-batches are cut from length-sorted pairs and padding does not enter a score), where
#: exports are cached (model.cache_dir), torch's thread count (model.num_threads) and the bi-encoder's embedding
#: cache (model.embedding_cache); the scale, ray and storage sections (resources, not results), output.mode and
#: output.lease_timeout_s. Everything else stays: a setting that might change a score (max_length, templates,
#: prompt_template, padding_side, long_text and chunk settings, backend, dtype, device, activation) or the output
#: (top_n, rows_per_file, the input settings) must match.
SCORE_NEUTRAL: dict[str, tuple[str, ...]] = {
    "model": ("batch_size", "max_batch_tokens", "cache_dir", "num_threads", "embedding_cache"),
    "output": ("mode", "lease_timeout_s", "score_store"),  # the store changes where a score comes from, not it
    "input": ("uri",),  # the files themselves are compared (input_files)
}
SCORE_NEUTRAL_SECTIONS = ("scale", "ray", "storage")


def job_fingerprint(config: RerankJobConfig, model: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    """What shapes a job's output: a resume must match it. The settings that cannot change a score or the output
    (`SCORE_NEUTRAL`) are left out, so they may differ. `inputs`: each input file's content identity."""
    data = comparable(config.model_dump(mode="json"))
    data["model_revision"] = model.get("revision")
    data["input_files"] = dict(sorted(inputs.items()))
    return data


def comparable(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint (or a config dump) without the score-neutral settings: what a resume compares (an older
    rerank recorded some of them)."""
    data = {k: v for k, v in fingerprint.items() if k not in SCORE_NEUTRAL_SECTIONS}
    for section, keys in SCORE_NEUTRAL.items():
        if isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k not in keys}
    return data


def _refuse_changed_job(
    uri: str, recorded: dict[str, Any], fingerprint: dict[str, Any], storage: Storage, finished: bool
) -> None:
    """Raise OutputError if the job recorded in the output differs from this one (config or input content)."""
    what = "the finished job" if finished else "the job"
    files = input_changes(recorded.get("input_files", {}), fingerprint["input_files"], storage.uri)
    rest = differences(
        {k: v for k, v in comparable(recorded).items() if k != "input_files"},
        {k: v for k, v in comparable(fingerprint).items() if k != "input_files"},
    )
    diff = files + rest
    if not diff:
        return
    more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
    raise OutputError(
        f"cannot resume {uri}: this job differs from {what} recorded there: {'; '.join(diff[:3])}{more}; use the "
        "same config and input, or output.mode=overwrite to start over (or pick a new output.uri)"
    )


def _check_results(uri: str, progress: Progress, summary: dict[str, Any]) -> None:
    """A finished job's published files are all there, as its summary recorded them (`result_files`: path in
    the output -> bytes): OutputError naming what is missing or changed, before a resume says there is nothing to
    do. A summary written before the files were recorded cannot be checked (said in a log line)."""
    recorded = summary.get("result_files")
    if not isinstance(recorded, dict) or not recorded:
        log.info("rerank: %s: its summary lists no result files (an older rerank wrote it): not checked", uri)
        return
    out = progress.out
    try:
        listed = progress.storage.fs.find(out, detail=True, withdirs=False)
    except FileNotFoundError:
        listed = {}
    except Exception as err:  # noqa: BLE001 - botocore's hierarchy, as for listing
        raise OutputError(f"cannot list output {uri}: {type(err).__name__}: {err}") from None
    sizes = {p.rstrip("/")[len(out) + 1 :]: int(info.get("size") or 0) for p, info in listed.items()}
    problems = [
        f"{name} is missing" if name not in sizes else f"{name} has {sizes[name]:,} bytes, {size:,} recorded"
        for name, size in sorted(recorded.items())
        if sizes.get(name) != size
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise OutputError(
            f"cannot resume {uri}: its finished job's results are not all there: {'; '.join(problems[:3])}{more}; "
            "rerun with output.mode=overwrite to redo the job"
        )


def _input_roots(storage: Storage, uris: str | list[str]) -> list[str]:
    """The folders (or files) an input URI names: a glob's folder above its first pattern character."""
    roots = []
    for uri in [uris] if isinstance(uris, str) else uris:
        path = storage.path(uri)
        cut = min((path.index(c) for c in "*?[" if c in path), default=None)
        roots.append(path[:cut].rsplit("/", 1)[0] if cut is not None else path)
    return roots


def _check_overlaps(
    config: RerankJobConfig,
    out_storage: Storage,
    out_path: str,
    inputs: list[tuple[str, Storage, list[str], list[str]]],
    work_inputs: bool = False,
) -> list[str]:
    """Refuse an output folder that is, holds or lies in any input (its files or the folders named), compared on
    resolved paths (local: symlinks, ``..``, repeated and trailing slashes; S3: prefix spellings): a later run
    would read the results as input, and an overwrite would delete the input. The same for a local model folder
    and model.cache_dir. `inputs`: (what, storage, roots, files). Returns the resolved paths no deletion in the
    output may touch. `work_inputs`: inputs in the output's own `_work/` are the cascade's earlier stages (its
    work, deleted with it once the output is published), not the user's."""
    protect: list[str] = []
    work = out_storage.resolved(f"{out_path.rstrip('/')}/{WORK}") + "/"
    for what, storage, roots, files in inputs:
        if storage.protocol != out_storage.protocol:
            continue
        for other in roots + files:
            if work_inputs and (storage.resolved(other) + "/").startswith(work):
                continue
            if out_storage.overlaps(out_path, other):
                really = out_storage.resolved(out_path)
                shown = f" (really {out_storage.uri(really)})" if really != out_path.rstrip("/") else ""
                target = storage.resolved(other)
                other_shown = f" (really {storage.uri(target)})" if target != other.rstrip("/") else ""
                raise OutputError(
                    f"output.uri {config.output.uri}{shown} overlaps the {what} {storage.uri(other)}{other_shown}: a "
                    "later run would read the results as input, and output.mode=overwrite would delete it; choose "
                    f"a folder outside the {what}"
                )
            protect.append(storage.resolved(other))
    if out_storage.protocol == "file":
        for what, folder in (("model folder", config.model.name_or_path), ("model.cache_dir", config.model.cache_dir)):
            local = os.path.expanduser(folder) if folder else None
            if local and os.path.isdir(local):
                if out_storage.overlaps(out_path, os.path.abspath(local)):
                    raise OutputError(
                        f"output.uri {config.output.uri} overlaps the {what} {os.path.abspath(local)} (compared where "
                        "they really are): output.mode=overwrite could delete it; choose a folder outside it"
                    )
                protect.append(os.path.realpath(local))
    return sorted(set(protect))


@dataclass
class JobPlan:
    """Everything checked before any cluster time is spent: input files and layout, corpus, model, output."""

    config: RerankJobConfig
    storage: Storage
    files: list[FileInfo]
    footers: list[Footer] | None  # each input file's, read once by the plan; None on a resume that needs none
    layout: InputLayout
    corpus: tuple[Storage, list[Footer]] | None
    model: dict[str, Any]
    out_storage: Storage
    out_path: str
    state: str
    fingerprint: dict[str, Any]
    seen: tuple[bool, bool] = (False, False)  # _output_seen when planned: hold_output checks it again
    protected: list[str] = field(default_factory=list)  # resolved input paths: no deletion in the output touches them
    lease: Lease | None = field(default=None, repr=False, compare=False)  # the output's, once hold_output took it

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    @property
    def progress(self) -> Progress:
        """The output folder's state, as this run's: once the plan holds the lease, nothing is read, written or
        deleted there as this run's after it is lost; no deletion touches the job's inputs."""
        return Progress(self.out_storage, self.out_path, self.lease, self.protected)

    @property
    def already_complete(self) -> bool:
        return self.state == COMPLETE and self.config.output.mode == "resume"


def plan_rerank(config: RerankJobConfig, on_cluster: bool | None = None, held: Lease | None = None) -> JobPlan:
    """Validate a job without Ray: raises InputError / OutputError / ConfigError naming the problem.
    `on_cluster`: the job will run on a cluster (default: RAY_ADDRESS is set), so with model.device auto the
    device is the actors', checked once they are known. `held`: the output's lease, already this run's (a
    cascade's last stage, whose input is the stage before's results in the output's `_work/`)."""
    from pipelines.engine.ray_runtime import joins_cluster
    from pipelines.model.scoring import describe_model

    out_storage = Storage.for_uri(config.output.uri, config.storage)
    out_path = out_storage.path(config.output.uri)
    progress = Progress(out_storage, out_path)
    try:
        state = progress.state()
        # What the decisions below rest on, read with the state: hold_output compares it once it holds the lease
        # (a run that held the folder may finish while this plan reads footers and loads the tokenizer).
        seen = _output_seen(progress) if state != EMPTY else (False, False)
    except Exception as err:  # noqa: BLE001 - botocore's hierarchy, as for listing
        raise OutputError(f"cannot access output {config.output.uri}: {type(err).__name__}: {err}") from None
    mode = config.output.mode
    manifest = progress.read_manifest() if mode == "resume" and state == INCOMPLETE else None
    if manifest is not None and manifest.get("version") != MANIFEST_VERSION:
        raise OutputError(
            f"cannot resume {config.output.uri}: its work folder was written by another version of rerank "
            f"(manifest version {manifest.get('version')}, this one writes {MANIFEST_VERSION}); start over "
            "with output.mode=overwrite"
        )
    planned = manifest if manifest is not None and manifest.get("units") is not None else None
    storage, files, footers, layout = inspect_input(config, planned)
    corpus = inspect_corpus(config, layout) if config.input.corpus_uri else None
    model = describe_model(config.model, joins_cluster() if on_cluster is None else on_cluster)
    inputs = [("input", storage, _input_roots(storage, config.input.uri), [f.path for f in files])]
    if corpus:
        inputs.append(
            ("corpus", corpus[0], _input_roots(corpus[0], config.input.corpus_uri), [f.info.path for f in corpus[1]])
        )
    protected = _check_overlaps(config, out_storage, out_path, inputs, work_inputs=held is not None)
    timeout = config.output.lease_timeout_s
    holder = live_lease(progress, timeout) if state != EMPTY else None
    if holder is not None and (
        held is None or holder.get("token") != held.token
    ):  # not stale by its holder's rule (its own timeout; alive on this machine)
        raise OutputError(
            f"output {config.output.uri} is in use by another run ({describe_holder(holder, holder['age_s'], timeout)}"
            "); wait for it to finish, or stop it; one job writes one output folder at a time"
        )
    identities = _identities(storage, files, footers)
    if corpus:
        identities |= _identities(corpus[0], [f.info for f in corpus[1]], corpus[1])
    fingerprint = job_fingerprint(config, model, identities)
    refuse_by_state(config.output.uri, mode, state, progress.describe_incomplete)
    if manifest is not None:
        _refuse_changed_job(config.output.uri, manifest.get("fingerprint", {}), fingerprint, storage, False)
    if mode == "resume" and state == COMPLETE:
        summary = progress.read_summary() or {}
        recorded = summary.get("fingerprint")
        if not recorded:
            raise OutputError(
                f"cannot resume {config.output.uri}: its finished job does not record what produced it (written by "
                "an older rerank), so it cannot be checked against this one; use output.mode=overwrite to redo it"
            )
        _refuse_changed_job(config.output.uri, recorded, fingerprint, storage, True)
        _check_results(config.output.uri, progress, summary)  # "already complete" only with every result there
    if not (mode == "resume" and state == COMPLETE):
        progress_dir = out_path if state == EMPTY else f"{out_path}/_work"
        out_storage.check_writable(progress_dir)
    plan = JobPlan(config, storage, files, footers, layout, corpus, model, out_storage, out_path, state, fingerprint)
    plan.seen, plan.protected = seen, protected
    return plan


def refuse_by_state(uri: str, mode: str, state: str, unfinished: Callable[[], str]) -> None:
    """OutputError when output.mode does not allow what the output folder holds: an unfinished run without
    --resume (`unfinished` says what it is), files that are not a rerank job's, a finished job without
    overwrite. One home for the rule, for a job and a cascade."""
    if mode == "error" and state == INCOMPLETE:
        raise OutputError(
            f"output {uri} holds {unfinished()}: finish it with --resume (output.mode=resume), or start over with "
            "output.mode=overwrite"
        )
    if mode in ("error", "resume") and state == FOREIGN:
        raise OutputError(
            f"output {uri} already holds files that are not a rerank job's; set output.mode=overwrite to replace "
            "them or pick a new output.uri"
        )
    if mode == "error" and state == COMPLETE:
        raise OutputError(
            f"output {uri} already holds a finished job; set output.mode=overwrite to replace it or pick a new "
            "output.uri"
        )


class OutputChanged(OutputError):
    """The output folder changed between the plan and taking its lease (another run finished or wrote there)."""


def _output_seen(progress: Progress) -> tuple[bool, bool]:
    """What a plan's decisions rest on: whether the output has _SUCCESS, and a manifest."""
    fs = progress.storage.fs
    return fs.exists(f"{progress.out}/{SUCCESS}"), fs.exists(progress.manifest_path)


def hold_output(plan: JobPlan) -> Lease:
    """Take the output folder's lease for this job (refused with OutputError naming the holder if another run has
    it); the caller passes it to `run_rerank`, which releases it. Entry points take it before Ray starts, so a
    second run is refused at once. OutputChanged if the folder changed since the plan looked at it (a run that
    held it finished in between): plan again (`plan_and_hold` does)."""
    lease = Lease(Progress(plan.out_storage, plan.out_path), plan.config.output.lease_timeout_s)
    lease.acquire(takeover=plan.config.output.mode in ("resume", "overwrite"))
    if _output_seen(plan.progress) != plan.seen:
        lease.release()
        raise OutputChanged(
            f"output {plan.config.output.uri} changed while this run was starting (another run finished or wrote "
            "there); run the command again"
        )
    plan.lease = lease
    return lease


def plan_and_hold(config: RerankJobConfig, plan: JobPlan | None = None) -> tuple[JobPlan, Lease | None]:
    """The plan and the output's lease, planned once more if the output changed before the lease was taken;
    no lease (None) when the plan finds the job already complete."""
    plan = plan or plan_rerank(config)
    for attempt in range(2):
        if plan.already_complete:
            return plan, None
        try:
            return plan, hold_output(plan)
        except OutputChanged:
            if attempt:
                raise
            plan = plan_rerank(config)
    raise AssertionError("unreachable")


def credentials_error() -> str:
    names = ", ".join(f"storage.{k} ({v})" for k, v in StorageConfig.CREDENTIAL_ENV.items())
    return (
        f"S3 keys in the config ({names}) are not sent to Ray workers: set the environment variables named here "
        "(or AWS_PROFILE, an instance role or IRSA) where the job runs; `rerank run` on a local Ray moves them "
        "there for you, a job on a cluster needs them in the cluster's environment (e.g. a Kubernetes Secret)"
    )
