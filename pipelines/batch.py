"""The batch job on Ray Data: read, validate, (join a corpus), score in an actor pool, top-N per query, write.

This module is the only place that wires Ray Data. It expects Ray to be running (entry points start it) and
never collects data on the driver: blocks stream from the reader through the actors to the writer.

Two shapes of plan:
- packed input (a row per query, candidates in a list): every actor call holds whole queries, so the actor
  writes the final top-N itself; no shuffle at all.
- flat input (a row per pair, a query's rows anywhere) and any corpus join: each actor call keeps only the
  top-N of every query it saw (a query's global top-N is among those), then a hash shuffle on query_id brings
  the survivors of each query together for the final top-N. The shuffle moves at most top_n rows per query
  per block, not the candidates.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import records
from pipelines.config import ModelConfig, RerankJobConfig, StorageConfig
from pipelines.errors import InputError
from pipelines.records import FLAT, PACKED, InputLayout
from pipelines.storage import Storage

log = logging.getLogger(__name__)

SHUFFLE_BYTES_PER_PARTITION = 256 * 1024**2


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
    rows_written: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    input_files: int = 0
    wall_time_s: float = 0.0
    pairs_per_s: float = 0.0
    scale: dict[str, Any] = field(default_factory=dict)

    def one_line(self) -> str:
        rej = (
            f", {self.rejected:,} rejected ({', '.join(f'{k}: {v}' for k, v in self.rejected_by_reason.items())})"
            if self.rejected
            else ""
        )
        return (
            f"rerank: {self.queries:,} queries, {self.pairs_scored:,} pairs scored, {self.rows_written:,} rows written"
            f"{rej} in {self.wall_time_s:.1f} s ({self.pairs_per_s:.1f} pairs/s) -> {self.output_uri}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- workers


class Counts:
    """A tiny actor the stages report their counts to (a job's pairs in and pairs scored)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, **values: int) -> None:
        for k, v in values.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass
class RejectSink:
    """Writes rejected rows to `<output>/_rejects/` from whichever worker finds them."""

    output_uri: str
    storage: StorageConfig

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            st = Storage.for_uri(self.output_uri, self.storage)
            st.write_table_once(st.path(self.output_uri) + "/_rejects", table)


def prepare_pairs(batch: pa.Table, *, layout: InputLayout, explode: bool, sink: RejectSink, counts: Any) -> pa.Table:
    """Normalise a batch to valid pairs; rejects go to the sink. Runs as a Ray task fused with the read."""
    rejects = []
    if explode:
        batch, empty = records.explode_packed(batch, layout)
        rejects.append(empty)
    columns = records.pair_columns(layout, with_text=layout.has_text)
    pairs = batch.select(columns)
    counts.add.remote(pairs_in=pairs.num_rows + sum(r.num_rows for r in rejects))
    valid, bad = records.split_rejects(pairs, layout)
    rejects.append(bad)
    sink.write(pa.concat_tables(rejects))
    return valid


def check_joined_text(batch: pa.Table, *, layout: InputLayout, sink: RejectSink) -> pa.Table:
    """After the corpus join: pairs whose doc_id the corpus lacks, or whose text is blank, are rejected."""
    valid, bad = records.split_missing_text(batch, layout)
    sink.write(bad)
    return valid


class ScoreActor:
    """One model per actor; each call scores a batch and keeps the top-N of every query in it."""

    def __init__(
        self,
        model: ModelConfig,
        layout: InputLayout,
        top_n: int,
        final: bool,
        num_threads: int,
        sink: RejectSink,
        counts: Any,
    ) -> None:
        import torch

        from pipelines.scoring import Scorer

        if model.num_threads is None and not torch.cuda.is_available():
            torch.set_num_threads(num_threads)
        self.scorer = Scorer(model)
        self.layout, self.top_n, self.final, self.sink, self.counts = layout, top_n, final, sink, counts

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.layout.layout == PACKED and self.final:
            batch = prepare_pairs(batch, layout=self.layout, explode=True, sink=self.sink, counts=self.counts)
        scores = self.scorer.score(batch.column("query").to_pylist(), batch.column("text").to_pylist())
        keep = ["query_id", "doc_id"] + (["first_stage_rank"] if self.layout.has_first_stage_rank else [])
        scored = batch.select(keep).append_column("score", pa.array(scores, pa.float32()))
        scored, bad = records.split_non_finite(scored, self.layout)
        self.sink.write(bad)
        self.counts.add.remote(pairs_scored=scored.num_rows)
        top = records.top_n_per_query(scored, self.top_n, with_rank=self.final)
        return top.select(records.output_columns(self.layout)) if self.final else top


def final_top_n(group: pa.Table, *, top_n: int, columns: list[str]) -> pa.Table:
    return records.top_n_per_query(group, top_n).select(columns)


# ---------------------------------------------------------------------------- planning


def _schemas(storage: Storage, files: list[str]) -> list[pa.Schema]:
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(storage.read_schema, files))


def inspect_input(config: RerankJobConfig) -> tuple[Storage, list[tuple[str, int]], InputLayout, pa.Schema]:
    """List the input files and check that every one has the same usable layout."""
    uris = config.input.uri if isinstance(config.input.uri, list) else [config.input.uri]
    storage = Storage.for_uri(uris[0], config.storage)
    if any(Storage.for_uri(u, config.storage).protocol != storage.protocol for u in uris):
        raise InputError("input.uri mixes storage schemes; give paths on one storage")
    files = storage.list_parquet(uris)
    paths = [p for p, _ in files]
    schemas = _schemas(storage, paths)
    corpus = config.input.corpus_uri is not None
    layout = records.detect_layout(schemas[0], storage.uri(paths[0]), corpus)
    for path, schema in zip(paths[1:], schemas[1:]):
        other = records.detect_layout(schema, storage.uri(path), corpus)
        if other != layout:
            raise InputError(
                f"{storage.uri(path)} does not match {storage.uri(paths[0])}: {other} vs {layout}; "
                "all input files must share one layout and id types"
            )
    return storage, files, layout, schemas[0]


def inspect_corpus(config: RerankJobConfig, layout: InputLayout) -> tuple[Storage, list[tuple[str, int]]]:
    storage = Storage.for_uri(config.input.corpus_uri, config.storage)
    files = storage.list_parquet(config.input.corpus_uri)
    paths = [p for p, _ in files]
    for path, schema in zip(paths, _schemas(storage, paths)):
        records.check_corpus(schema, storage.uri(path), layout.doc_id_type)
    return storage, files


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
        else:
            n = max(1, int((resources.get("CPU", 1.0) - 2) // scale.num_cpus_per_actor))
    else:
        n = scale.num_actors
    for name, amount in scale.resources_per_actor.items():
        if resources.get(name, 0.0) < amount:
            log.warning("scale.resources_per_actor: no node offers %s=%g yet; the actors wait for one", name, amount)
        elif scale.num_actors == "auto":
            n = min(n, int(resources[name] // amount))
    return {
        "min_actors": n,
        "max_actors": max(n, scale.max_actors or n),
        "num_gpus_per_actor": float(gpus),
        "num_cpus_per_actor": scale.num_cpus_per_actor,
        "resources_per_actor": dict(scale.resources_per_actor),
        "batch_rows": scale.batch_rows,
    }


def _num_partitions(config: RerankJobConfig, total_bytes: int) -> int:
    if config.scale.num_partitions:
        return config.scale.num_partitions
    return max(2, min(128, math.ceil(total_bytes / SHUFFLE_BYTES_PER_PARTITION)))


def _mean_candidates(storage: Storage, path: str) -> float:
    """Mean candidate-list length in the first row group of a packed file, to size actor batches in pairs."""
    import pyarrow.parquet as pq

    with storage.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if pf.metadata.num_row_groups == 0:
            return 1.0
        lengths = pc.list_value_length(pf.read_row_group(0, columns=["candidates"]).column("candidates"))
        mean = pc.mean(lengths).as_py()
    return max(1.0, mean or 1.0)


# ---------------------------------------------------------------------------- the job


@dataclass
class JobPlan:
    """Everything checked before any cluster time is spent: input files and layout, corpus, model, output."""

    config: RerankJobConfig
    storage: Storage
    files: list[tuple[str, int]]
    layout: InputLayout
    schema: pa.Schema
    corpus: tuple[Storage, list[tuple[str, int]]] | None
    model: dict[str, Any]
    out_storage: Storage
    out_path: str

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.files]


def plan_rerank(config: RerankJobConfig) -> JobPlan:
    """Validate a job without Ray: raises InputError / OutputError / ConfigError naming the problem."""
    from pipelines.scoring import describe_model

    storage, files, layout, schema = inspect_input(config)
    corpus = inspect_corpus(config, layout) if config.input.corpus_uri else None
    model = describe_model(config.model)
    out_storage = Storage.for_uri(config.output.uri, config.storage)
    protect = [p for p, _ in files] + ([p for p, _ in corpus[1]] if corpus else [])
    out_path = out_storage.check_output(
        config.output.uri, config.output.mode, protect if out_storage.protocol == storage.protocol else []
    )
    return JobPlan(config, storage, files, layout, schema, corpus, model, out_storage, out_path)


def run_rerank(config: RerankJobConfig, plan: JobPlan | None = None) -> JobSummary:
    """Run one reranking job. Ray must already be initialised (or RAY_ADDRESS set) by the caller."""
    import ray
    import ray.data

    from pipelines.scoring import default_threads

    started = time.perf_counter()
    plan = plan or plan_rerank(config)
    storage, files, layout, corpus, paths = plan.storage, plan.files, plan.layout, plan.corpus, plan.paths
    out_storage, out_path = plan.out_storage, plan.out_path
    out_storage.clear_output(out_path)
    scale = resolve_scale(config)
    partitions = _num_partitions(config, sum(s for _, s in files))
    log.info(
        "rerank: %d input file(s), %s layout%s; %d-%d scoring actor(s) x %.2g CPU / %.2g GPU",
        len(paths),
        layout.layout,
        " + corpus join" if corpus else "",
        scale["min_actors"],
        scale["max_actors"],
        scale["num_cpus_per_actor"],
        scale["num_gpus_per_actor"],
    )

    sink = RejectSink(config.output.uri, config.storage)
    counts = ray.remote(num_cpus=0)(Counts).remote()
    packed_direct = layout.layout == PACKED and corpus is None
    # Only the columns the job uses: less I/O. For flat input the schema of those columns (checked equal in every
    # file by the plan) is given too, so extra columns whose types differ between files do not matter.
    read_args: dict[str, Any] = {"columns": ["query_id", "query", "candidates"]}
    if layout.layout == FLAT:
        read_args["columns"] = records.pair_columns(layout, layout.has_text)
        read_args["schema"] = pa.schema([plan.schema.field(c) for c in read_args["columns"]])
    try:
        ds = ray.data.read_parquet(paths, filesystem=storage.arrow_fs, **read_args)
    except Exception as err:  # noqa: BLE001 - re-raised as it is unless it is an input schema conflict
        raise _as_input_error(err) from None
    if packed_direct:
        rows_per_call = max(1, int(scale["batch_rows"] / _mean_candidates(storage, paths[0])))
    else:
        rows_per_call = scale["batch_rows"]
        ds = ds.map_batches(
            prepare_pairs,
            batch_format="pyarrow",
            fn_kwargs={
                "layout": layout,
                "explode": layout.layout == PACKED,
                "sink": sink,
                "counts": counts,
            },
        )
    if corpus is not None:
        corpus_storage, corpus_files = corpus
        docs = ray.data.read_parquet(
            [p for p, _ in corpus_files], filesystem=corpus_storage.arrow_fs, columns=["doc_id", "text"]
        ).map_batches(_cast_corpus, batch_format="pyarrow", fn_kwargs={"doc_id_type": layout.doc_id_type})
        ds = ds.join(docs, join_type="left_outer", num_partitions=partitions, on=("doc_id",))
        ds = ds.map_batches(check_joined_text, batch_format="pyarrow", fn_kwargs={"layout": layout, "sink": sink})
    # Small inputs can arrive as one block; even blocks keep every actor busy.
    ds = ds.repartition(target_num_rows_per_block=rows_per_call)
    ds = ds.map_batches(
        ScoreActor,
        batch_format="pyarrow",
        batch_size=rows_per_call,
        compute=ray.data.ActorPoolStrategy(min_size=scale["min_actors"], max_size=scale["max_actors"]),
        num_cpus=scale["num_cpus_per_actor"],
        num_gpus=scale["num_gpus_per_actor"],
        resources=scale["resources_per_actor"] or None,
        fn_constructor_kwargs={
            "model": config.model,
            "layout": layout,
            "top_n": config.output.top_n,
            "final": packed_direct,
            "num_threads": default_threads(scale["num_cpus_per_actor"]),
            "sink": sink,
            "counts": counts,
        },
    )
    columns = records.output_columns(layout)
    if not packed_direct:
        ds = ds.groupby("query_id", num_partitions=partitions).map_groups(
            final_top_n, batch_format="pyarrow", fn_kwargs={"top_n": config.output.top_n, "columns": columns}
        )
    try:
        ds.write_parquet(
            out_storage.uri(out_path),
            filesystem=out_storage.arrow_fs,
            min_rows_per_file=min(config.output.rows_per_file, 500_000),
            max_rows_per_file=config.output.rows_per_file,
        )
    except Exception as err:  # noqa: BLE001 - re-raised as it is unless it is an input schema conflict
        raise _as_input_error(err) from None

    counted = ray.get(counts.get.remote())
    ray.kill(counts)
    summary = JobSummary(
        output_uri=config.output.uri,
        layout=layout.layout + (" + corpus" if corpus else ""),
        config=config.model_dump(mode="json"),
        model=plan.model,
        input_files=len(paths),
        pairs_in=counted.get("pairs_in", 0),
        pairs_scored=counted.get("pairs_scored", 0),
        scale=scale | {"shuffle_partitions": None if packed_direct else partitions},
    )
    _count_output(out_storage, out_path, summary)
    summary.wall_time_s = round(time.perf_counter() - started, 3)
    summary.pairs_per_s = round(summary.pairs_scored / summary.wall_time_s, 2) if summary.wall_time_s else 0.0
    out_storage.write_json(out_path + "/_summary.json", summary.to_dict())
    out_storage.write_text(out_path + "/_SUCCESS", "")
    return summary


def _cast_corpus(batch: pa.Table, *, doc_id_type: pa.DataType) -> pa.Table:
    return pa.table(
        {"doc_id": batch.column("doc_id").cast(doc_id_type), "text": batch.column("text").cast(pa.string())}
    )


def _count_output(storage: Storage, out_path: str, summary: JobSummary) -> None:
    """Rows written and queries served (rows ranked 1) from the files themselves; rejects by reason."""
    for path in storage.parquet_files(out_path):
        rank = storage.read_column(path, "rank")
        summary.rows_written += len(rank)
        summary.queries += pc.sum(pc.equal(rank, 1)).as_py() or 0
    reasons: dict[str, int] = {}
    for path in storage.parquet_files(out_path + "/_rejects"):
        for item in pc.value_counts(storage.read_column(path, "reason")).to_pylist():
            reasons[item["values"]] = reasons.get(item["values"], 0) + item["counts"]
    summary.rejected_by_reason = dict(sorted(reasons.items()))
    summary.rejected = sum(reasons.values())


def _as_input_error(err: Exception) -> Exception:
    """Schema conflicts between input files surface deep inside Ray; name them for the user."""
    text = str(err)
    for marker in ("Unable to merge", "Schema at index", "unify schemas", "incompatible types"):
        if marker in text:
            first = next((ln for ln in text.splitlines() if marker in ln), text.splitlines()[-1])
            return InputError(f"the input files cannot be read as one table: {first.strip()[:300]}")
    return err
