"""The batch job on Ray: plan, score input units in an actor pool, reduce to the top-N per query, check, publish.

This module wires the job to Ray; it expects Ray to be running (entry points start it) and never collects the
data on the driver. The shape (see ``pipelines.progress`` for the files it leaves next to the output):

1. **Plan** (no Ray): list the input files, read each one's footer once, check their layout, the model, the
   corpus and the output, and cut the input into *units* along row groups (``pipelines.reads``): whole row
   groups of about ``scale.unit_rows`` pairs, or slices of a larger one.
2. **Score** (an actor pool, map-only): an actor reads a unit, rejects bad rows with a reason, drops duplicate
   pairs, scores the rest and keeps the top-N of every query the unit holds (a query's global top-N is among
   the union of these). It commits the unit: its partial top-N, its rejects and its counts, under names fixed
   by the unit. A retried or resumed unit rewrites the same files; a unit that did not commit is redone. A
   corpus join, when asked, runs first as a Ray Data join whose result becomes the units' input.
3. **Reduce** (Ray tasks, cheap and simply rerun), in two rounds so that its reads grow with units + groups x
   buckets, not units x buckets: groups of ``MERGE_FANIN`` units' partials -> one file each with a row group
   per reduce bucket (a query's bucket fixed by a hash of its id), their rejects -> one file each in
   ``_rejects/``; then per bucket: its row groups -> one copy per (query_id, doc_id) -> the final top-N ->
   result files, each written atomically.
4. **Check and publish**: counts from the commits (never from a live counter, so retries cannot double them),
   streamed, summed and dropped; ``pairs_in == pairs_scored + rejected``, every query with a scored pair present
   exactly once with ranks 1..n, every reject written; then ``_summary.json`` and ``_SUCCESS``.

The actors are plain Ray actors with small constructor arguments (no object-store references, so a restart
never depends on evicted objects) and explicit fault settings: a dead actor is restarted up to
``scale.max_restarts`` times and its units go back to the queue, up to ``scale.unit_retries`` times each; an
actor that cannot load its model fails the job at once with the model's error.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import records
from pipelines.config import ModelConfig, RerankJobConfig, StorageConfig
from pipelines.errors import ConfigError, InputError, OutputError, RerankError
from pipelines.progress import (
    COMPLETE,
    EMPTY,
    FOREIGN,
    INCOMPLETE,
    SUCCESS,
    Lease,
    Progress,
    describe_holder,
    differences,
    input_changes,
    live_lease,
)
from pipelines.reads import (
    Footer,
    Unit,
    UnitReader,
    identity,
    needs_footer_for_identity,
    plan_units,
    read_footers,
)
from pipelines.records import FLAT, PACKED, InputLayout
from pipelines.storage import FileInfo, Storage

log = logging.getLogger(__name__)

BUCKET_BYTES = 128 * 1024**2  # partial-file bytes (compressed top-N rows) per reduce bucket
JOIN_BYTES = 256 * 1024**2  # input bytes per partition of the corpus join
MANIFEST_VERSION = 2  # 2: input files identified by content (S3 ETag; local size, mtime and footer hash)
UNITS_IN_FLIGHT_PER_ACTOR = 2  # one scoring, one queued: an actor never waits for the driver


class JobError(RerankError):
    """The job could not finish: its actors died, a unit kept failing, or its own accounting did not add up."""


@dataclass
class JobSummary:
    """What `_summary.json` holds; `one_line()` is what the CLI prints at the end."""

    output_uri: str
    layout: str
    config: dict[str, Any]
    model: dict[str, Any]
    queries: int = 0
    pairs_in: int = 0
    pairs_scored: int = 0
    windows_scored: int = 0
    rows_written: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    input_files: int = 0
    #: Input rows decoded by the units of the job (those scored before a resume included) per row they hold:
    #: 1.0 when every row was decoded once; more when a slice of a large row group was read out of order.
    read_amplification: float = 0.0
    units: int = 0
    units_resumed: int = 0
    units_retried: int = 0
    wall_time_s: float = 0.0
    pairs_per_s: float = 0.0
    #: Where the wall time went: plan_s, first_actor_s (with its actor_imports_s and model_load_s), scoring_s
    #: (first unit handed out to last commit), reduce_s.
    timings_s: dict[str, float] = field(default_factory=dict)
    scale: dict[str, Any] = field(default_factory=dict)
    #: What shaped the output (the manifest's record, see `job_fingerprint`): a resume of this finished job must
    #: match it, or it is refused.
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def one_line(self) -> str:
        rej = (
            f", {self.rejected:,} rejected ({', '.join(f'{k}: {v}' for k, v in self.rejected_by_reason.items())})"
            if self.rejected
            else ""
        )
        resumed = f", {self.units_resumed:,} of {self.units:,} units done before this run" if self.units_resumed else ""
        return (
            f"rerank: {self.queries:,} queries, {self.pairs_scored:,} pairs scored, {self.rows_written:,} rows written"
            f"{rej}{resumed} in {self.wall_time_s:.1f} s ({self.pairs_per_s:.1f} pairs/s) -> {self.output_uri}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSummary:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------- scoring a unit


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a scoring actor needs; small, so Ray passes it inline (nothing in the object store)."""

    model: ModelConfig
    layout: InputLayout
    storage: StorageConfig
    input_protocol_uri: str
    output_uri: str
    top_n: int
    batch_rows: int
    max_text_bytes: int
    corpus: bool
    num_cpus: float  # what each actor reserved: its torch threads, counted on its own node
    corpus_packed: bool = False  # joined input made from packed candidates (rows marked _no_candidates)


def bucket_of(query_ids: pa.ChunkedArray | pa.Array, buckets: int) -> np.ndarray:
    """The reduce bucket of every row: a stable hash of the query id (the same in every process and run)."""
    if buckets == 1:
        return np.zeros(len(query_ids), dtype=np.int64)
    unique = pc.unique(query_ids)
    hashed = np.array([zlib.crc32(str(v).encode()) % buckets for v in unique.to_pylist()], dtype=np.int64)
    return hashed[pc.index_in(query_ids, unique).to_numpy(zero_copy_only=False)]


def _parquet_bytes(table: pa.Table, groups: list[pa.Table] | None = None) -> bytes:
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema) as writer:
        for part in groups or [table]:
            writer.write_table(part, row_group_size=max(1, part.num_rows))
    return buf.getvalue()


def score_unit(
    unit: Unit, spec: WorkerSpec, scorer: Any, reader: UnitReader, progress: Progress, node: str = ""
) -> dict[str, Any]:
    """Read, validate, score and commit one unit; returns its commit record (its counts)."""
    layout = spec.layout
    decoded_before = reader.rows_decoded
    if layout.layout == PACKED:
        table = reader.read(unit, ["query_id", "query", "candidates"])
        rows_read = table.num_rows
        pairs, empty = records.explode_packed(table, layout)
        rejects = [empty]
    else:
        flags = ["_no_candidates"] if spec.corpus_packed else []
        pairs = reader.read(unit, records.pair_columns(layout, with_text=True) + flags)
        rows_read = pairs.num_rows
        rejects = []
    pairs_in = pairs.num_rows + sum(r.num_rows for r in rejects)
    valid, bad = records.split_rejects(pairs, layout, spec.max_text_bytes, corpus=spec.corpus)
    valid, dup = records.split_duplicates(valid, layout)
    rejects += [bad, dup]

    queries, texts = valid.column("query").to_pylist(), valid.column("text").to_pylist()
    scores, windows = [], 0
    for i in range(0, len(queries), spec.batch_rows):
        scores.append(scorer.score(queries[i : i + spec.batch_rows], texts[i : i + spec.batch_rows]))
        windows += getattr(scorer, "last_windows", len(scores[-1]))
    keep = ["query_id", "doc_id"] + (["first_stage_rank"] if layout.has_first_stage_rank else [])
    score_array = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    scored = valid.select(keep).append_column("score", pa.array(score_array, pa.float32()))
    scored, non_finite = records.split_non_finite(scored, layout)
    rejects.append(non_finite)

    top = records.top_n_per_query(scored, spec.top_n, with_rank=False)

    rejected = pa.concat_tables([r.cast(layout.reject_schema) for r in rejects])
    by_reason = {item["values"]: item["counts"] for item in pc.value_counts(rejected.column("reason")).to_pylist()}
    record = {
        "uid": unit.uid,
        "pairs_in": pairs_in,
        "pairs_scored": scored.num_rows,
        "windows_scored": windows,
        "rejected": dict(sorted(by_reason.items())),
        "partial_rows": top.num_rows,
        "rejected_rows": rejected.num_rows,
        "rows": rows_read,
        "rows_decoded": reader.rows_decoded - decoded_before,  # > rows: rows decoded again to reach a slice
        "node": node,
        "pid": os.getpid(),  # the process that scored it: which actor, when chasing one
    }
    if pairs_in != scored.num_rows + rejected.num_rows:
        raise JobError(
            f"unit {unit.uid}: {pairs_in} pairs in but {scored.num_rows} scored + {rejected.num_rows} rejected"
        )
    partial = _parquet_bytes(top) if top.num_rows else None
    record["partial_bytes"] = len(partial) if partial is not None else 0
    progress.commit_unit(
        unit.uid,
        partial,
        _parquet_bytes(rejected) if rejected.num_rows else None,
        record,
    )
    return record


class ScoreWorker:
    """A scoring actor: one model copy; `run(unit)` scores and commits one unit."""

    def __init__(self, spec: WorkerSpec) -> None:
        started = time.perf_counter()
        import torch

        from pipelines.scoring import Scorer, default_threads

        if spec.model.num_threads is None and not torch.cuda.is_available():
            torch.set_num_threads(default_threads(spec.num_cpus))
        self.spec = spec
        imported = time.perf_counter()
        self.scorer = Scorer(spec.model)
        self.timings = {"actor_imports_s": imported - started, "model_load_s": time.perf_counter() - imported}
        self.reader = UnitReader(Storage.for_uri(spec.input_protocol_uri, spec.storage))
        out = Storage.for_uri(spec.output_uri, spec.storage)
        self.progress = Progress(out, out.path(spec.output_uri))
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def ready(self) -> dict[str, Any]:
        return {"node_id": self.node, "pid": os.getpid(), **self.timings}

    def run(self, unit: Unit) -> dict[str, Any]:
        return score_unit(unit, self.spec, self.scorer, self.reader, self.progress, self.node)


# ---------------------------------------------------------------------------- the reduce


@dataclass(frozen=True)
class ReduceSpec:
    layout: InputLayout
    storage: StorageConfig
    output_uri: str
    top_n: int
    rows_per_file: int
    buckets: int


#: Units per merge task, the reduce's first round: each bucket's reducer then reads one row group per group of
#: this many units, so the reduce makes about units + groups x buckets reads instead of units x buckets.
MERGE_FANIN = 256


def merge_group(group: int, partials: list[tuple[str, int]], rejects: list[str], spec: ReduceSpec) -> dict[str, Any]:
    """The first round of the reduce: a group of units' partials (uid, file size) -> one file with a row group
    per bucket (a query's bucket fixed by a hash of its id), and their rejects -> one published reject file. Each
    unit's files are read once, whole (a partial in one ranged GET: its size is known)."""
    out = Storage.for_uri(spec.output_uri, spec.storage)
    progress = Progress(out, out.path(spec.output_uri))

    def partial(part: tuple[str, int]) -> pa.Table:
        path = progress.partial_path(part[0])
        data = out.fs.cat_file(path, start=0, end=part[1]) if out.protocol != "file" else None
        return pq.read_table(io.BytesIO(data)) if data is not None else _read(out, path, None)

    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(partial, partials))
        bad = list(pool.map(lambda uid: _read(out, progress.unit_rejects_path(uid), None), rejects))
    placed: dict[str, int] = {}
    if tables:
        top = pa.concat_tables(tables)
        buckets = bucket_of(top.column("query_id"), spec.buckets)
        order = np.argsort(buckets, kind="stable")
        top, buckets = top.take(pa.array(order)), buckets[order]
        present = sorted(set(buckets.tolist()))
        starts = np.searchsorted(buckets, present)
        ends = np.searchsorted(buckets, present, side="right")
        out.write_bytes(
            progress.merged_path(group),
            _parquet_bytes(top, [top.slice(int(a), int(b - a)) for a, b in zip(starts, ends)]),
        )
        placed = {str(b): i for i, b in enumerate(present)}
    rejected_rows = 0
    if bad:
        merged = pa.concat_tables([t.cast(spec.layout.reject_schema) for t in bad])
        out.write_parquet(progress.rejects_path(f"part-{group:05d}"), merged)
        rejected_rows = merged.num_rows
    return {"group": group, "buckets": placed, "rejected_rows": rejected_rows}


def output_schema(layout: InputLayout) -> pa.Schema:
    fields = [
        pa.field("query_id", layout.query_id_type),
        pa.field("doc_id", layout.doc_id_type),
        pa.field("rank", pa.int32()),
        pa.field("score", pa.float32()),
    ]
    if layout.has_first_stage_rank:
        fields.append(pa.field("first_stage_rank", pa.int64()))
    return pa.schema(fields)


def reduce_bucket(bucket: int, parts: list[tuple[int, int]], spec: ReduceSpec, write_empty: bool) -> dict[str, Any]:
    """The final top-N of one bucket's queries from the merged groups' row groups of it (`parts`: (group, row
    group)); writes result files and checks them."""
    out = Storage.for_uri(spec.output_uri, spec.storage)
    progress = Progress(out, out.path(spec.output_uri))

    def read(part: tuple[int, int]) -> pa.Table:
        group, row_group = part
        with out.fs.open(progress.merged_path(group), "rb") as f:
            return pq.ParquetFile(f).read_row_group(row_group)

    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(read, parts))
    schema = output_schema(spec.layout)
    partial = pa.concat_tables(tables) if tables else None
    if partial is None or partial.num_rows == 0:
        kept, dups = schema.empty_table(), spec.layout.reject_schema.empty_table()
        top = schema.empty_table()
    else:
        kept, dups = records.best_of_duplicates(partial, spec.layout)
        top = records.top_n_per_query(kept, spec.top_n).select(schema.names).cast(schema)
    files = []
    if top.num_rows or write_empty:
        for j, start in enumerate(range(0, max(top.num_rows, 1), spec.rows_per_file)):
            path = progress.output_path(bucket, j)
            out.write_parquet(path, top.slice(start, spec.rows_per_file))
            files.append(path)
    if dups.num_rows:
        out.write_parquet(progress.rejects_path(f"reduce-{bucket:05d}"), dups)
    # Check what was written, from the files: ranks 1..n per query, one row per (query_id, doc_id).
    problems, queries_out = [], 0
    if files:
        written = pa.concat_tables([_read(out, p, ["query_id", "doc_id", "rank"]) for p in files])
        ordered = written.sort_by([("query_id", "ascending"), ("rank", "ascending")])
        if not np.array_equal(records.positions_in_groups(ordered.column("query_id")), ordered.column("rank")):
            problems.append(f"bucket {bucket}: ranks are not 1..n within every query")
        if written.group_by(["query_id", "doc_id"]).aggregate([]).num_rows != written.num_rows:
            problems.append(f"bucket {bucket}: a (query_id, doc_id) appears twice")
        queries_out = pc.sum(pc.equal(written.column("rank"), 1)).as_py() or 0
    queries_in = len(pc.unique(kept.column("query_id"))) if kept.num_rows else 0
    if queries_in != queries_out:
        problems.append(f"bucket {bucket}: {queries_in} queries with scored pairs but {queries_out} in the results")
    return {
        "bucket": bucket,
        "rows": top.num_rows,
        "queries": queries_out,
        "duplicates": dups.num_rows,
        "problems": problems,
    }


# ---------------------------------------------------------------------------- planning


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


def resolve_scale(config: RerankJobConfig) -> dict[str, Any]:
    import ray

    scale = config.scale
    resources = ray.cluster_resources()
    gpus_total = resources.get("GPU", 0.0)
    gpus = scale.num_gpus_per_actor
    if gpus == "auto":
        wants_gpu = config.model.device == "auto" or config.model.device.startswith("cuda")
        gpus = 1.0 if wants_gpu and gpus_total >= 1 else 0.0
    if scale.num_actors == "auto":
        if gpus > 0:
            n = max(1, int(gpus_total // gpus))
        elif scale.actor_resources:
            n = max(1, int(min(resources.get(k, 0.0) / v for k, v in scale.actor_resources.items() if v > 0)))
        else:
            n = max(1, int((resources.get("CPU", 1.0) - 2) // scale.num_cpus_per_actor))
    else:
        n = scale.num_actors
    return {
        "min_actors": n,
        "max_actors": max(n, scale.max_actors or n),
        "num_gpus_per_actor": float(gpus),
        "num_cpus_per_actor": scale.num_cpus_per_actor,
        "actor_resources": dict(scale.actor_resources),
        "batch_rows": scale.batch_rows,
        "unit_rows": scale.unit_rows,
    }


def _join_partitions(config: RerankJobConfig, input_bytes: int) -> int:
    """Partitions of the corpus join: scale.num_partitions, else one per JOIN_BYTES of input (no cap)."""
    return config.scale.num_partitions or max(2, math.ceil(input_bytes / JOIN_BYTES))


def reduce_buckets(config: RerankJobConfig, partial_bytes: int) -> int:
    """Buckets of the final top-N: scale.num_partitions, else one per BUCKET_BYTES of the units' partial files,
    known once they are written (no cap: a bucket's reducer holds its share in memory)."""
    return config.scale.num_partitions or max(1, math.ceil(partial_bytes / BUCKET_BYTES))


def job_fingerprint(config: RerankJobConfig, model: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    """What shapes a job's output: a resume must match it. Scale, Ray, storage settings, output.mode and the
    lease timeout do not change the results, so they may differ. `inputs`: each input file's content identity."""
    data = config.model_dump(mode="json")
    for section in ("scale", "ray", "storage"):
        data.pop(section, None)
    data["output"].pop("mode", None)
    data["output"].pop("lease_timeout_s", None)
    data["input"].pop("uri", None)  # the files themselves are compared
    data["model"].pop("num_threads", None)
    data["model_revision"] = model.get("revision")
    data["input_files"] = dict(sorted(inputs.items()))
    return data


def _refuse_changed_job(
    uri: str, recorded: dict[str, Any], fingerprint: dict[str, Any], storage: Storage, finished: bool
) -> None:
    """Raise OutputError if the job recorded in the output differs from this one (config or input content)."""
    what = "the finished job" if finished else "the job"
    files = input_changes(recorded.get("input_files", {}), fingerprint["input_files"], storage.uri)
    rest = differences(
        {k: v for k, v in recorded.items() if k != "input_files"},
        {k: v for k, v in fingerprint.items() if k != "input_files"},
    )
    diff = files + rest
    if not diff:
        return
    more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
    raise OutputError(
        f"cannot resume {uri}: this job differs from {what} recorded there: {'; '.join(diff[:3])}{more}; use the "
        "same config and input, or output.mode=overwrite to start over (or pick a new output.uri)"
    )


def _input_roots(storage: Storage, uris: str | list[str]) -> list[str]:
    roots = []
    for uri in [uris] if isinstance(uris, str) else uris:
        path = storage.path(uri)
        cut = min((path.index(c) for c in "*?[" if c in path), default=None)
        roots.append(path[:cut].rsplit("/", 1)[0] if cut is not None else path)
    return roots


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

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    @property
    def progress(self) -> Progress:
        return Progress(self.out_storage, self.out_path)

    @property
    def already_complete(self) -> bool:
        return self.state == COMPLETE and self.config.output.mode == "resume"


def plan_rerank(config: RerankJobConfig, on_cluster: bool | None = None) -> JobPlan:
    """Validate a job without Ray: raises InputError / OutputError / ConfigError naming the problem.
    `on_cluster`: the job will run on a cluster (default: RAY_ADDRESS is set), so with model.device auto the
    device is the actors', checked once they are known."""
    from pipelines.scoring import describe_model

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
    model = describe_model(config.model, on_cluster)
    if out_storage.protocol == storage.protocol:
        protect = [f.path for f in files] + _input_roots(storage, config.input.uri)
        if corpus:
            protect += [f.info.path for f in corpus[1]] + _input_roots(corpus[0], config.input.corpus_uri)
        for other in protect:
            o = other.rstrip("/")
            if o == out_path or o.startswith(out_path + "/") or out_path.startswith(o + "/"):
                raise OutputError(
                    f"output.uri {config.output.uri} overlaps the input {storage.uri(o)}: a later run would read "
                    "the results as input; choose a folder outside the input"
                )
    holder = live_lease(progress, config.output.lease_timeout_s) if state != EMPTY else None
    if holder is not None:
        raise OutputError(
            f"output {config.output.uri} is in use by another run ({describe_holder(holder, holder['age_s'])}); "
            "wait for it to finish, or stop it; one job writes one output folder at a time"
        )
    identities = _identities(storage, files, footers)
    if corpus:
        identities |= _identities(corpus[0], [f.info for f in corpus[1]], corpus[1])
    fingerprint = job_fingerprint(config, model, identities)
    if mode == "error" and state == INCOMPLETE:
        raise OutputError(
            f"output {config.output.uri} holds {progress.describe_incomplete()}: finish it with --resume "
            "(output.mode=resume), or start over with output.mode=overwrite"
        )
    if mode in ("error", "resume") and state == FOREIGN:
        raise OutputError(
            f"output {config.output.uri} already holds files that are not a rerank job's; set output.mode=overwrite "
            "to replace them or pick a new output.uri"
        )
    if mode == "error" and state == COMPLETE:
        raise OutputError(
            f"output {config.output.uri} already holds a finished job; set output.mode=overwrite to replace it or "
            "pick a new output.uri"
        )
    if manifest is not None:
        _refuse_changed_job(config.output.uri, manifest.get("fingerprint", {}), fingerprint, storage, False)
    if mode == "resume" and state == COMPLETE:
        recorded = (progress.read_summary() or {}).get("fingerprint")
        if not recorded:
            raise OutputError(
                f"cannot resume {config.output.uri}: its finished job does not record what produced it (written by "
                "an older rerank), so it cannot be checked against this one; use output.mode=overwrite to redo it"
            )
        _refuse_changed_job(config.output.uri, recorded, fingerprint, storage, True)
    if not (mode == "resume" and state == COMPLETE):
        progress_dir = out_path if state == EMPTY else f"{out_path}/_work"
        out_storage.check_writable(progress_dir)
    return JobPlan(
        config, storage, files, footers, layout, corpus, model, out_storage, out_path, state, fingerprint, seen
    )


# ---------------------------------------------------------------------------- the job


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
    lease = Lease(plan.progress, plan.config.output.lease_timeout_s)
    lease.acquire(takeover=plan.config.output.mode in ("resume", "overwrite"))
    if _output_seen(plan.progress) != plan.seen:
        lease.release()
        raise OutputChanged(
            f"output {plan.config.output.uri} changed while this run was starting (another run finished or wrote "
            "there); run the command again"
        )
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


def run_rerank(config: RerankJobConfig, plan: JobPlan | None = None, lease: Lease | None = None) -> JobSummary:
    """Run (or resume) one reranking job. Ray must already be initialised by the caller. `lease`: the output's
    lease from `hold_output`, when the caller took it already (released here either way).

    S3 keys in ``config.storage`` are refused: Ray workers get credentials from their environment or the AWS
    credential chain, never as task or actor arguments (``rerank run`` moves keys from a config file into the
    environment of the local Ray it starts)."""
    started = time.perf_counter()
    try:
        if config.storage.has_credentials:
            raise ConfigError(credentials_error())
        plan = plan or plan_rerank(config)
        if plan.already_complete:
            recorded = plan.progress.read_summary() or {}
            log.info("rerank: %s is already complete; nothing to do", config.output.uri)
            return JobSummary.from_dict(recorded | {"output_uri": config.output.uri})
        return _run_planned(config, plan, lease, started)
    finally:
        if lease is not None:
            lease.release()


def _run_planned(config: RerankJobConfig, plan: JobPlan, lease: Lease | None, started: float) -> JobSummary:
    # One job per output folder, from before the first write to the last: refused if another run holds it.
    scale = resolve_scale(config)
    from pipelines import backends
    from pipelines.scoring import max_batch_tokens

    device = backends.actor_device(config.model, scale["num_gpus_per_actor"])
    backends.check_model_on(config.model, device)  # on the actors' device, before any of them starts
    model = plan.model | {"device": str(device), "max_batch_tokens": max_batch_tokens(config.model, device)}
    own = lease is None
    if own:
        plan, lease = plan_and_hold(config, plan)
        if lease is None:  # another run finished it meanwhile
            return JobSummary.from_dict((plan.progress.read_summary() or {}) | {"output_uri": config.output.uri})
    try:
        return _run_leased(config, plan, lease, started, scale, model)
    finally:
        if own:
            lease.release()


def credentials_error() -> str:
    names = ", ".join(f"storage.{k} ({v})" for k, v in StorageConfig.CREDENTIAL_ENV.items())
    return (
        f"S3 keys in the config ({names}) are not sent to Ray workers: set the environment variables named here "
        "(or AWS_PROFILE, an instance role or IRSA) where the job runs; `rerank run` on a local Ray moves them "
        "there for you, a job on a cluster needs them in the cluster's environment (e.g. a Kubernetes Secret)"
    )


def _run_leased(
    config: RerankJobConfig, plan: JobPlan, lease: Lease, started: float, scale: dict[str, Any], model: dict[str, Any]
) -> JobSummary:
    progress = plan.progress
    if (
        config.output.mode != "overwrite"
        and plan.state != COMPLETE
        and progress.storage.exists(f"{plan.out_path}/{SUCCESS}")
    ):  # only an overwrite replaces a finished output's results (hold_output's check makes this unreachable)
        raise OutputChanged(f"output {config.output.uri} was finished by another run while this one started")
    if config.output.mode == "overwrite" and plan.state != EMPTY:
        progress.clear_all()

    manifest = progress.read_manifest() if plan.state == INCOMPLETE else None
    layout = plan.layout
    if manifest is None:
        partitions = _join_partitions(config, sum(f.size for f in plan.files))
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
            unit_storage, unit_files = _join_corpus(config, plan, partitions)
            layout = _joined_layout(layout)
            unit_footers = read_footers(unit_storage, unit_files)
        else:
            unit_footers = plan.footers if plan.footers is not None else read_footers(plan.storage, plan.files)
        units, _ = plan_units(unit_footers, layout, config.scale.unit_rows)
        manifest["units"] = [u.to_list() for u in units]
        progress.write_manifest(manifest)
    else:
        units = [Unit.from_list(row) for row in manifest["units"]]
        if plan.corpus is not None:
            unit_storage, layout = plan.out_storage, _joined_layout(layout)

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

    spec = WorkerSpec(
        model=config.model,
        layout=layout,
        storage=config.storage,
        input_protocol_uri=unit_storage.uri(units[0].path) if units else config.output.uri,
        output_uri=config.output.uri,
        top_n=config.output.top_n,
        batch_rows=config.scale.batch_rows,
        max_text_bytes=config.input.max_text_bytes,
        corpus=plan.corpus is not None,
        num_cpus=scale["num_cpus_per_actor"],
        corpus_packed=plan.corpus is not None and plan.layout.layout == PACKED,
    )
    timings: dict[str, float] = {"plan_s": time.perf_counter() - started}
    # Commit records: those of this run come back from the actors; only units done before it are read back.
    totals = _Totals()
    for _, record in progress.read_done([u.uid for u in units if u.uid in done]):
        totals.add(record, now=False)
    retried = _score_units(spec, todo, scale, config, timings, totals) if todo else 0

    summary = JobSummary(
        output_uri=config.output.uri,
        layout=plan.layout.layout + (" + corpus" if plan.corpus else ""),
        config=config.model_dump(mode="json"),
        model=model,
        input_files=len(plan.files),
        units=len(units),
        units_resumed=len(units) - len(todo),
        units_retried=retried,
        scale=scale
        | {
            "units_by_node": dict(totals.units_by_node),
        },
    )
    summary.fingerprint = plan.fingerprint
    lease.check()  # a run that lost the output folder to another must not touch its results
    reduce_started = time.perf_counter()
    _reduce(plan, layout, totals, summary)
    timings["reduce_s"] = time.perf_counter() - reduce_started
    summary.timings_s = {k: round(v, 3) for k, v in timings.items()}
    summary.wall_time_s = round(time.perf_counter() - started, 3)
    summary.pairs_per_s = round(totals.scored_now / summary.wall_time_s, 2) if summary.wall_time_s else 0.0
    progress.finish(summary.to_dict(), lease)
    return summary


def _joined_layout(layout: InputLayout) -> InputLayout:
    return InputLayout(
        layout=FLAT,
        query_id_type=layout.query_id_type,
        doc_id_type=layout.doc_id_type,
        has_text=True,
        has_first_stage_rank=layout.has_first_stage_rank,
        has_first_stage_score=layout.has_first_stage_score,
    )


def _join_corpus(config: RerankJobConfig, plan: JobPlan, partitions: int) -> tuple[Storage, list[FileInfo]]:
    """Candidates joined with the corpus text (Ray Data), written under _work/joined/; its files are the units'
    input. Packed candidates are flattened first; a row whose doc_id the corpus lacks keeps a null text."""
    import ray.data

    layout = plan.layout
    joined = f"{plan.out_path}/_work/joined"
    plan.out_storage.remove(joined)
    columns = ["query_id", "query", "candidates"] if layout.layout == PACKED else records.pair_columns(layout, False)
    ds = ray.data.read_parquet(plan.paths, filesystem=plan.storage.arrow_fs, columns=columns)
    ds = ds.map_batches(_flatten_for_join, batch_format="pyarrow", fn_kwargs={"layout": layout})
    corpus_storage, corpus_files = plan.corpus
    docs = ray.data.read_parquet(
        [f.info.path for f in corpus_files], filesystem=corpus_storage.arrow_fs, columns=["doc_id", "text"]
    ).map_batches(_cast_corpus, batch_format="pyarrow", fn_kwargs={"doc_id_type": layout.doc_id_type})
    # doc_ids must be unique: counted by a Ray Data aggregation over the cluster, only a repeated one comes back.
    repeated = (
        docs.select_columns(["doc_id"])
        .groupby("doc_id", num_partitions=max(2, partitions))
        .count()
        .map_batches(_repeated_only, batch_format="pyarrow")
        .take(1)
    )
    if repeated:
        raise InputError(
            f"the corpus {config.input.corpus_uri} holds doc_id {repeated[0]['doc_id']!r} more than once; doc_ids "
            "must be unique (deduplicate the corpus first)"
        )
    ds = ds.join(docs, join_type="left_outer", num_partitions=max(2, partitions), on=("doc_id",))
    ds = ds.map_batches(
        _joined_columns,
        batch_format="pyarrow",
        fn_kwargs={"layout": _joined_layout(layout), "packed": layout.layout == PACKED},
    )
    try:
        ds.write_parquet(plan.out_storage.uri(joined), filesystem=plan.out_storage.arrow_fs)
    except Exception as err:  # noqa: BLE001 - re-raised as it is unless it is an input schema conflict
        raise _as_input_error(err) from None
    return plan.out_storage, plan.out_storage.list_parquet(plan.out_storage.uri(joined))


def _repeated_only(counts: pa.Table) -> pa.Table:
    return counts.filter(pc.greater(counts.column("count()"), 1))


def _flatten_for_join(batch: pa.Table, *, layout: InputLayout) -> pa.Table:
    """Packed rows to one row per candidate; a query without candidates keeps one row, marked `_no_candidates`
    (it becomes a no_candidates reject after the join)."""
    batch = records.decode_dictionaries(batch)
    if layout.layout != PACKED:
        return batch
    flat, empty = records.explode_packed(batch, layout)
    filler = {c: pa.nulls(empty.num_rows, flat.schema.field(c).type) for c in flat.column_names}
    filler["query_id"] = empty.column("query_id")
    both = pa.concat_tables([flat, pa.table(filler, schema=flat.schema)])
    flags = np.zeros(both.num_rows, dtype=bool)
    flags[flat.num_rows :] = True
    return both.append_column("_no_candidates", pa.array(flags))


def _joined_columns(batch: pa.Table, *, layout: InputLayout, packed: bool) -> pa.Table:
    return batch.select(records.pair_columns(layout, with_text=True) + (["_no_candidates"] if packed else []))


def _cast_corpus(batch: pa.Table, *, doc_id_type: pa.DataType) -> pa.Table:
    return pa.table(
        {"doc_id": batch.column("doc_id").cast(doc_id_type), "text": batch.column("text").cast(pa.string())}
    )


class _WorkQueue:
    """Units waiting to be scored, grouped in chains (the slices of one large row group, see `pipelines.reads`;
    any other unit is a chain of one). An actor is handed its chain's units in order, so its reader decodes each
    row once; a free chain goes to the next actor that asks; when none is free, an idle actor takes the second
    half of the longest chain another holds (its reader decodes the skipped rows once more). Every operation is
    O(1) but stealing, which is O(actors). A chain is stolen from only while it has STEAL_MIN units waiting:
    the thief decodes the rows before its half again, worth it only for a long tail."""

    STEAL_MIN = 4

    def __init__(self, units: list[Unit]):
        self.pending: dict[str, collections.deque] = {}
        self.key_of: dict[str, str] = {}
        for u in units:
            key = u.chain or u.uid
            self.pending.setdefault(key, collections.deque()).append(u)
            self.key_of[u.uid] = key
        self.free = collections.deque(self.pending)  # chains no actor holds, in input order
        self.is_free = set(self.pending)
        self.current: dict[Any, str] = {}  # actor -> the chain it holds
        self.held: dict[str, Any] = {}  # chain -> its actor
        self.size = len(units)
        self.steals = 0

    def __len__(self) -> int:
        return self.size

    def take(self, actor: Any) -> Unit | None:
        key = self.current.get(actor)
        if key is not None and self.pending.get(key):
            return self._pop(key)
        self._release(actor)
        while self.free:
            key = self.free.popleft()
            self.is_free.discard(key)
            if self.pending.get(key):
                return self._hold(actor, key)
        victim = max(
            (k for k in self.held if len(self.pending.get(k, ())) >= self.STEAL_MIN),
            key=lambda k: len(self.pending[k]),
            default=None,
        )
        if victim is None:
            return None
        q = self.pending[victim]
        tail = collections.deque(q.pop() for _ in range(len(q) // 2))
        tail.reverse()
        self.steals += 1
        key = f"{victim}~{self.steals}"
        self.pending[key] = tail
        for u in tail:
            self.key_of[u.uid] = key
        return self._hold(actor, key)

    def put_back(self, unit: Unit) -> None:
        """A unit to score again (its attempt failed): first in its chain."""
        key = self.key_of[unit.uid]
        self.pending.setdefault(key, collections.deque()).appendleft(unit)
        self.size += 1
        if key not in self.held and key not in self.is_free:
            self.free.appendleft(key)
            self.is_free.add(key)

    def drop_actor(self, actor: Any) -> None:
        """An actor that died: the rest of its chain is free for the others."""
        self._release(actor)

    def _release(self, actor: Any) -> None:
        key = self.current.pop(actor, None)
        if key is None:
            return
        self.held.pop(key, None)
        if self.pending.get(key) and key not in self.is_free:
            self.free.appendleft(key)
            self.is_free.add(key)

    def _hold(self, actor: Any, key: str) -> Unit:
        self.current[actor], self.held[key] = key, actor
        return self._pop(key)

    def _pop(self, key: str) -> Unit:
        self.size -= 1
        unit = self.pending[key].popleft()
        if not self.pending[key]:
            del self.pending[key]
        return unit


def _score_units(
    spec: WorkerSpec,
    units: list[Unit],
    scale: dict[str, Any],
    config: RerankJobConfig,
    timings: dict[str, float],
    totals: _Totals,
) -> int:
    """Score units on an actor pool until every one has committed. Units of an actor that died go back to the
    queue (each at most scale.unit_retries times); an actor that cannot start fails the job with its error.
    Fills `timings` (first_actor_s and that actor's own split, scoring_s); returns the units retried."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    options: dict[str, Any] = {
        "num_cpus": scale["num_cpus_per_actor"],
        "num_gpus": scale["num_gpus_per_actor"],
        "max_restarts": config.scale.max_restarts,
        "max_task_retries": 0,  # the driver re-queues a lost unit itself, counting attempts
    }
    if scale["actor_resources"]:
        options["resources"] = scale["actor_resources"]
    worker = ray.remote(ScoreWorker).options(**options)
    actors = [worker.remote(spec) for _ in range(min(scale["max_actors"], len(units)))]
    probing = {a.ready.remote(): a for a in actors}
    ready: list[Any] = []
    load: collections.Counter = collections.Counter()
    inflight: dict[Any, tuple[Any, Unit]] = {}
    queue = _WorkQueue(units)
    attempts: collections.Counter = collections.Counter()
    lost: collections.Counter = collections.Counter()  # deaths per actor, against scale.max_restarts
    started = time.monotonic()
    line = _ProgressLine(len(units), started)
    lost_all_since: float | None = None  # when the last ready actor died (all restarting or gone)
    reprobe_at: dict[Any, float] = {}  # unreachable actors (their node may be going): ask again at this time
    any_ready, finished, pairs = False, 0, 0
    try:
        while queue or inflight:
            for actor, when in list(reprobe_at.items()):
                if when <= time.monotonic():
                    del reprobe_at[actor]
                    probing[actor.ready.remote()] = actor
            for actor in ready:
                while queue and load[actor] < UNITS_IN_FLIGHT_PER_ACTOR:
                    unit = queue.take(actor)
                    if unit is None:
                        break
                    inflight[actor.run.remote(unit)] = (actor, unit)
                    load[actor] += 1
            if not inflight and not probing and not reprobe_at:
                raise JobError(
                    f"every scoring actor died ({finished} of {len(units)} units done; rerun with --resume to keep "
                    "them); see the errors above (ray logs) for why"
                )
            wait_s = min(_ProgressLine.EVERY_S, max(1.0, config.scale.actor_start_timeout_s / 10))
            if reprobe_at:
                wait_s = min(wait_s, max(0.05, min(reprobe_at.values()) - time.monotonic()))
            refs = list(inflight) + list(probing)
            if refs:
                done, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
            else:  # only unreachable actors, to ask again
                time.sleep(wait_s)
                done = []
            now = time.monotonic()
            if ready or inflight:
                lost_all_since = None
            elif any_ready and lost_all_since is None:
                lost_all_since = now
            if not done:
                waited = now - (lost_all_since if lost_all_since is not None else started)
                if (not any_ready or lost_all_since is not None) and waited > config.scale.actor_start_timeout_s:
                    lacks = (
                        f"the cluster lacks {scale['num_cpus_per_actor']} CPU / {scale['num_gpus_per_actor']} GPU"
                        f"{' / ' + str(scale['actor_resources']) if scale['actor_resources'] else ''} free per actor"
                    )
                    if not any_ready:
                        raise JobError(
                            f"no scoring actor started within {config.scale.actor_start_timeout_s:.0f} s: {lacks}"
                        )
                    raise JobError(
                        f"every scoring actor died and none restarted within {config.scale.actor_start_timeout_s:.0f} "
                        f"s ({finished} of {len(units)} units done; rerun with --resume to keep them): {lacks}"
                    )
                line.show(now, finished, pairs, len(ready))
                continue
            ref = done[0]
            if ref in probing:
                actor = probing.pop(ref)
                try:
                    info = ray.get(ref)
                    ready.append(actor)
                    if not any_ready:
                        timings["first_actor_s"] = now - started
                        timings.update({k: info[k] for k in ("actor_imports_s", "model_load_s") if k in info})
                        log.info(
                            "rerank: first scoring actor ready after %.1f s (imports %.1f s, model load %.1f s)",
                            now - started,
                            info.get("actor_imports_s", 0.0),
                            info.get("model_load_s", 0.0),
                        )
                    any_ready = True
                except ActorUnavailableError:
                    # Not known dead: unreachable for now (e.g. its node is going). Ray answers again once it has
                    # restarted it or found it dead; asking at once would spin on the same refusal.
                    reprobe_at[actor] = now + 1.0
                except RayActorError as err:
                    if not any_ready:
                        raise JobError(f"the scoring actor could not start: {_root_cause(err)}") from None
                    lost[actor] += 1
                    if lost[actor] <= config.scale.max_restarts:  # died while starting: Ray restarts it
                        log.warning("rerank: a scoring actor died while starting: %s", _root_cause(err))
                        probing[actor.ready.remote()] = actor
                    else:
                        log.warning("rerank: a scoring actor is gone for good: %s", _root_cause(err))
                continue
            actor, unit = inflight.pop(ref)
            load[actor] -= 1
            try:
                record = ray.get(ref)
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, RerankError):
                    raise cause from None
                _retry(unit, attempts, config, queue, f"it failed: {_root_cause(err)}")
                continue
            except RayActorError as err:
                _retry(unit, attempts, config, queue, f"its actor died: {_root_cause(err)}")
                if actor in ready:  # a restarted actor answers ready() again; a dead one raises
                    ready.remove(actor)
                    queue.drop_actor(actor)
                    lost[actor] += 1
                    probing[actor.ready.remote()] = actor
                continue
            finished += 1
            totals.add(record, now=True)
            pairs += record["pairs_scored"]
            line.show(now, finished, pairs, len(ready), last=finished == len(units))
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    timings["scoring_s"] = time.monotonic() - started - timings.get("first_actor_s", 0.0)
    return sum(attempts.values())


class _ProgressLine:
    """One log line every EVERY_S seconds while units are scored: units and pairs done, the rate since the first
    commit, an ETA from the units' rate, the actors ready. Also readable when the output is piped to a file."""

    EVERY_S = 5.0

    def __init__(self, total_units: int, started: float):
        self.total, self.started = total_units, started
        self.first: tuple[float, int, int] | None = None  # (time, units, pairs) at the first commit
        self.last_shown = started

    def show(self, now: float, units: int, pairs: int, actors: int, last: bool = False) -> None:
        if units and self.first is None:
            self.first = (now, units, pairs)
        if not last and now - self.last_shown < self.EVERY_S:
            return
        self.last_shown = now
        if self.first is None or now <= self.first[0]:
            log.info("rerank: 0 of %d units done, %d actor(s) ready, %.0f s", self.total, actors, now - self.started)
            return
        t0, u0, p0 = self.first
        rate = (pairs - p0) / (now - t0)
        unit_rate = (units - u0) / (now - t0)
        eta = f", ETA {_duration((self.total - units) / unit_rate)}" if unit_rate > 0 and units < self.total else ""
        log.info(
            "rerank: %d of %d units (%.0f%%), %s pairs scored, %s pairs/s%s, %d actor(s)",
            units,
            self.total,
            100.0 * units / max(self.total, 1),
            f"{pairs:,}",
            f"{rate:,.0f}",
            eta,
            actors,
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _retry(unit: Unit, attempts: collections.Counter, config: RerankJobConfig, queue: _WorkQueue, why: str):
    attempts[unit.uid] += 1
    if attempts[unit.uid] > config.scale.unit_retries:
        raise JobError(
            f"unit {unit.uid} (rows {unit.start:,}-{unit.end:,} of {unit.path}) failed {attempts[unit.uid]} times; "
            f"last: {why}"
        )
    log.warning("rerank: retrying unit %s (attempt %d): %s", unit.uid, attempts[unit.uid] + 1, why)
    queue.put_back(unit)


def _root_cause(err: BaseException) -> str:
    """The last 'SomethingError: message' line of a Ray error (the user code's own error), else its first line."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception): ", ln)]
    line = lines[-1] if lines else (text.strip().splitlines() or [type(err).__name__])[0]
    return line[:500]


@dataclass
class _Totals:
    """What the driver keeps of the units' commit records, streamed: sums and, per unit, only whether it left a
    partial or rejects (O(units) small values, no per-bucket maps)."""

    pairs_in: int = 0
    pairs_scored: int = 0
    windows_scored: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    rejected_rows: int = 0
    rows: int = 0
    rows_decoded: int = 0
    scored_now: int = 0  # pairs scored by this run (not before a resume)
    units_by_node: collections.Counter = field(default_factory=collections.Counter)
    with_partial: list[tuple[str, int]] = field(default_factory=list)  # (uid, size of its partial file)
    with_rejects: list[str] = field(default_factory=list)

    def add(self, record: dict[str, Any], now: bool) -> None:
        """One unit's commit record (`now`: scored by this run)."""
        self.pairs_in += record["pairs_in"]
        self.pairs_scored += record["pairs_scored"]
        self.windows_scored += record.get("windows_scored", 0)
        self.rejected.update(record["rejected"])
        self.rejected_rows += record["rejected_rows"]
        self.rows += record.get("rows", 0)
        self.rows_decoded += record.get("rows_decoded", 0)
        self.units_by_node[record.get("node", "")] += 1
        if now:
            self.scored_now += record["pairs_scored"]
        if record["partial_rows"]:
            self.with_partial.append((record["uid"], record["partial_bytes"]))
        if record["rejected_rows"]:
            self.with_rejects.append(record["uid"])


def _reduce(plan: JobPlan, layout: InputLayout, totals: _Totals, summary: JobSummary) -> None:
    """The final top-N in two rounds of Ray tasks (groups of MERGE_FANIN units merged, then one task per bucket),
    then the job's accounting, checked."""
    import ray

    config = plan.config
    progress = plan.progress
    progress.clear_results()
    buckets = reduce_buckets(config, sum(size for _, size in totals.with_partial))
    summary.scale["reduce_buckets"] = buckets
    spec = ReduceSpec(
        layout, config.storage, config.output.uri, config.output.top_n, config.output.rows_per_file, buckets
    )
    partial, rejected = dict(totals.with_partial), set(totals.with_rejects)
    members = sorted(set(partial) | rejected)  # units that left anything to merge, in a stable order
    groups = [members[i : i + MERGE_FANIN] for i in range(0, len(members), MERGE_FANIN)]
    merge = ray.remote(merge_group).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
    merged = _get(
        [
            merge.remote(g, [(u, partial[u]) for u in group if u in partial], [u for u in group if u in rejected], spec)
            for g, group in enumerate(groups)
        ]
    )
    parts: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for result in merged:
        for bucket, row_group in result["buckets"].items():
            parts[int(bucket)].append((result["group"], row_group))
    task = ray.remote(reduce_bucket).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
    refs = [task.remote(b, parts[b], spec, False) for b in sorted(parts)] or [task.remote(0, [], spec, True)]
    results = _get(refs)

    reasons = totals.rejected
    summary.pairs_in, summary.pairs_scored = totals.pairs_in, totals.pairs_scored
    summary.windows_scored = totals.windows_scored
    duplicates = sum(r["duplicates"] for r in results)
    if duplicates:
        reasons[records.DUPLICATE] += duplicates
        summary.pairs_scored -= duplicates
    summary.read_amplification = round(totals.rows_decoded / totals.rows, 4) if totals.rows else 0.0
    summary.rejected_by_reason = dict(sorted(reasons.items()))
    summary.rejected = sum(reasons.values())
    summary.rows_written = sum(r["rows"] for r in results)
    summary.queries = sum(r["queries"] for r in results)

    problems = [p for r in results for p in r["problems"]]
    if summary.pairs_in != summary.pairs_scored + summary.rejected:
        problems.append(
            f"pairs_in {summary.pairs_in} != pairs_scored {summary.pairs_scored} + rejected {summary.rejected}"
        )
    rejected_rows = sum(r["rejected_rows"] for r in merged) + duplicates  # rows written to _rejects/
    if rejected_rows != summary.rejected:
        problems.append(f"{summary.rejected} rejects counted but {rejected_rows} rows written to _rejects/")
    if problems:
        raise JobError(f"the job's accounting does not add up, so no _SUCCESS was written: {'; '.join(problems)}")


def _get(refs: list[Any]) -> list[Any]:
    import ray

    try:
        return ray.get(refs)
    except Exception as err:  # noqa: BLE001
        cause = getattr(err, "cause", None)
        if isinstance(cause, RerankError):
            raise cause from None
        raise JobError(f"the final top-N failed: {_root_cause(err)}") from None


def _read(storage: Storage, path: str, columns: list[str] | None) -> pa.Table:
    with storage.fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _as_input_error(err: Exception) -> Exception:
    """Schema conflicts between input files surface deep inside Ray; name them for the user."""
    text = str(err)
    for marker in ("Unable to merge", "Schema at index", "unify schemas", "incompatible types"):
        if marker in text:
            first = next((ln for ln in text.splitlines() if marker in ln), text.splitlines()[-1])
            return InputError(f"the input files cannot be read as one table: {first.strip()[:300]}")
    return err
