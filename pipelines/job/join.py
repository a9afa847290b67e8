"""The corpus join (Ray Data): candidates without text joined with the corpus's text, written under
``_work/joined/``; its files become the units' input. Runs before the units are cut, once per job."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import RerankJobConfig
from pipelines.errors import InputError
from pipelines.io import rows as records
from pipelines.io.rows import FLAT, PACKED, InputLayout
from pipelines.io.storage import FileInfo, Storage
from pipelines.job.plan import JobPlan

JOIN_BYTES = 256 * 1024**2  # input bytes per partition of the corpus join


def join_partitions(config: RerankJobConfig, input_bytes: int) -> int:
    """Partitions of the corpus join: scale.num_partitions, else one per JOIN_BYTES of input (no cap)."""
    return config.scale.num_partitions or max(2, math.ceil(input_bytes / JOIN_BYTES))


def joined_layout(layout: InputLayout) -> InputLayout:
    return InputLayout(
        layout=FLAT,
        query_id_type=layout.query_id_type,
        doc_id_type=layout.doc_id_type,
        has_text=True,
        has_first_stage_rank=layout.has_first_stage_rank,
        has_first_stage_score=layout.has_first_stage_score,
    )


def join_corpus(config: RerankJobConfig, plan: JobPlan, partitions: int) -> tuple[Storage, list[FileInfo]]:
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
        fn_kwargs={"layout": joined_layout(layout), "packed": layout.layout == PACKED},
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


def _as_input_error(err: Exception) -> Exception:
    """Schema conflicts between input files surface deep inside Ray; name them for the user."""
    text = str(err)
    for marker in ("Unable to merge", "Schema at index", "unify schemas", "incompatible types"):
        if marker in text:
            first = next((ln for ln in text.splitlines() if marker in ln), text.splitlines()[-1])
            return InputError(f"the input files cannot be read as one table: {first.strip()[:300]}")
    return err
