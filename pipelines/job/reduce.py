"""The reduce: units' partial top-N -> the final top-N per query, in two rounds of Ray tasks so that its reads
grow with units + groups x buckets, not units x buckets.

1. ``merge_group``: groups of ``MERGE_FANIN`` units' partials -> one file each with a row group per reduce bucket
   (a query's bucket fixed by a hash of its id), their rejects -> one file each in ``_rejects/``;
2. ``reduce_bucket``: per bucket, its row groups -> one copy per (query_id, doc_id) -> the final top-N -> result
   files, each written atomically and checked from what was written.

Both are cheap and simply rerun (Ray task retries). ``reduce`` wires them and checks the job's accounting.
"""

from __future__ import annotations

import collections
import io
import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import RerankJobConfig, StorageConfig
from pipelines.engine.ray_data import rerank_error, root_cause
from pipelines.io import rows as records
from pipelines.io.commit import Progress
from pipelines.io.rows import InputLayout
from pipelines.io.storage import Storage
from pipelines.job.link import NO_LINK, CascadeLink
from pipelines.job.summary import JobError, JobSummary, Totals

if TYPE_CHECKING:
    from pipelines.job.plan import JobPlan

BUCKET_BYTES = 128 * 1024**2  # partial-file bytes (compressed top-N rows) per reduce bucket


def parquet_bytes(table: pa.Table, groups: list[pa.Table] | None = None) -> bytes:
    """A Parquet file in memory, one row group per table of `groups` (default: the whole table)."""
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema) as writer:
        for part in groups or [table]:
            writer.write_table(part, row_group_size=max(1, part.num_rows))
    return buf.getvalue()


def bucket_of(query_ids: pa.ChunkedArray | pa.Array, buckets: int) -> np.ndarray:
    """The reduce bucket of every row: a stable hash of the query id (the same in every process and run)."""
    if buckets == 1:
        return np.zeros(len(query_ids), dtype=np.int64)
    unique = pc.unique(query_ids)
    hashed = np.array([zlib.crc32(str(v).encode()) % buckets for v in unique.to_pylist()], dtype=np.int64)
    return hashed[pc.index_in(query_ids, unique).to_numpy(zero_copy_only=False)]


@dataclass(frozen=True)
class ReduceSpec:
    layout: InputLayout
    storage: StorageConfig
    output_uri: str
    top_n: int
    rows_per_file: int
    buckets: int
    link: CascadeLink = NO_LINK  # a cascade's stage: the columns it carries, its score column, its rejects' stage

    @property
    def reject_schema(self) -> pa.Schema:
        schema = self.layout.reject_schema
        return schema.append(pa.field("stage", pa.string())) if self.link.stage else schema

    def rejects(self, table: pa.Table) -> pa.Table:
        """Rejects as published: in a cascade, with the stage that rejected them named."""
        table = records.as_rejects(table, self.layout)
        if self.link.stage:
            table = table.append_column("stage", pa.array([self.link.stage] * table.num_rows, pa.string()))
        return table


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
        top = pa.concat_tables(tables, promote_options="default")  # a resume may have added a score store
        buckets = bucket_of(top.column("query_id"), spec.buckets)
        order = np.argsort(buckets, kind="stable")
        top, buckets = top.take(pa.array(order)), buckets[order]
        present = sorted(set(buckets.tolist()))
        starts = np.searchsorted(buckets, present)
        ends = np.searchsorted(buckets, present, side="right")
        out.write_bytes(
            progress.merged_path(group),
            parquet_bytes(top, [top.slice(int(a), int(b - a)) for a, b in zip(starts, ends)]),
        )
        placed = {str(b): i for i, b in enumerate(present)}
    rejected_rows, files = 0, {}
    if bad:
        merged = pa.concat_tables([spec.rejects(t) for t in bad])
        files |= _write(out, progress, progress.rejects_path(f"part-{group:05d}"), merged)
        rejected_rows = merged.num_rows
    return {"group": group, "buckets": placed, "rejected_rows": rejected_rows, "files": files}


def output_schema(layout: InputLayout, link: CascadeLink = NO_LINK) -> pa.Schema:
    fields = [
        pa.field("query_id", layout.query_id_type),
        pa.field("doc_id", layout.doc_id_type),
        pa.field("rank", pa.int32()),
        pa.field("score", pa.float32()),
    ]
    if layout.has_first_stage_rank:
        fields.append(pa.field("first_stage_rank", pa.int64()))
    fields += [pa.field(name, kind) for name, kind in link.carried_types.items()]
    if link.score_as:
        fields.append(pa.field(link.score_as, pa.float32()))
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
    schema = output_schema(spec.layout, spec.link)
    partial = pa.concat_tables(tables) if tables else None
    if partial is None or partial.num_rows == 0:
        kept, dups = schema.empty_table(), spec.layout.reject_schema.empty_table()
        top = schema.empty_table()
    else:
        kept, dups = records.best_of_duplicates(partial, spec.layout)
        top = records.top_n_per_query(kept, spec.top_n)
        if spec.link.score_as:
            top = top.append_column(spec.link.score_as, top.column("score"))
        top = top.select(schema.names).cast(schema)
    # Copies dropped as duplicates whose score came from the score store (counted as reused, not scored).
    dups_reused = 0
    if dups.num_rows and "reused" in partial.column_names:
        dups_reused = int(pc.sum(partial.column("reused")).as_py() or 0) - int(
            pc.sum(kept.column("reused")).as_py() or 0
        )
    files, published = [], {}
    if top.num_rows or write_empty:
        for j, start in enumerate(range(0, max(top.num_rows, 1), spec.rows_per_file)):
            path = progress.output_path(bucket, j)
            published |= _write(out, progress, path, top.slice(start, spec.rows_per_file))
            files.append(path)
    if dups.num_rows:
        published |= _write(out, progress, progress.rejects_path(f"reduce-{bucket:05d}"), spec.rejects(dups))
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
        "duplicates_reused": dups_reused,
        "problems": problems,
        "files": published,
    }


def _write(out: Storage, progress: Progress, path: str, table: pa.Table) -> dict[str, int]:
    """One published file (`Storage.write_parquet`'s bytes), and its record: {path in the output: bytes}, what
    `_summary.json` keeps (`result_files`) so that a resume can tell the results are all still there."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    out.write_bytes(path, data)
    return {path[len(progress.out) + 1 :]: len(data)}


# ---------------------------------------------------------------------------- planning


def reduce_buckets(config: RerankJobConfig, partial_bytes: int) -> int:
    """Buckets of the final top-N: scale.num_partitions, else one per BUCKET_BYTES of the units' partial files,
    known once they are written (no cap: a bucket's reducer holds its share in memory)."""
    return config.scale.num_partitions or max(1, math.ceil(partial_bytes / BUCKET_BYTES))


def reduce(
    plan: JobPlan, layout: InputLayout, totals: Totals, summary: JobSummary, link: CascadeLink = NO_LINK
) -> None:
    """The final top-N in two rounds of Ray tasks (groups of MERGE_FANIN units merged, then one task per bucket),
    then the job's accounting, checked."""
    import ray

    config = plan.config
    progress = plan.progress
    progress.clear_results()
    buckets = reduce_buckets(config, sum(size for _, size in totals.with_partial))
    summary.scale["reduce_buckets"] = buckets
    spec = ReduceSpec(
        layout, config.storage, config.output.uri, config.output.top_n, config.output.rows_per_file, buckets, link
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
    summary.pairs_reused = totals.pairs_reused
    summary.windows_scored = totals.windows_scored
    duplicates = sum(r["duplicates"] for r in results)
    if duplicates:
        reasons[records.DUPLICATE] += duplicates
        reused = sum(r.get("duplicates_reused", 0) for r in results)
        summary.pairs_scored -= duplicates - reused
        summary.pairs_reused -= reused
    summary.read_amplification = round(totals.rows_decoded / totals.rows, 4) if totals.rows else 0.0
    summary.rejected_by_reason = dict(sorted(reasons.items()))
    summary.rejected = sum(reasons.values())
    summary.rows_written = sum(r["rows"] for r in results)
    summary.result_files = dict(sorted(f for r in [*merged, *results] for f in r["files"].items()))
    summary.queries = sum(r["queries"] for r in results)

    problems = [p for r in results for p in r["problems"]]
    if summary.pairs_in != summary.pairs_scored + summary.pairs_reused + summary.rejected:
        problems.append(
            f"pairs_in {summary.pairs_in} != pairs_scored {summary.pairs_scored} + pairs_reused "
            f"{summary.pairs_reused} + rejected {summary.rejected}"
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
        ours = rerank_error(err)
        if ours is not None:
            raise ours from None
        raise JobError(f"the final top-N failed: {root_cause(err)}") from None


def _read(storage: Storage, path: str, columns: list[str] | None) -> pa.Table:
    with storage.fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)
