"""Rerank a Ray Dataset you already have: the batch job's stages on your own pipeline.

>>> import ray
>>> from pipelines.dataset import rerank_dataset
>>> ds = ray.data.read_parquet("s3://bucket/candidates/")        # one row per query, its candidates in a list
>>> ranked = rerank_dataset(ds, {"name_or_path": "cross-encoder/ms-marco-MiniLM-L6-v2"}, top_n=10,
...                         candidates="candidates")
>>> ranked.write_parquet("s3://bucket/reranked/")

Two shapes of rows:

- **pairs** (``candidates=None``): each row one (query, text) pair; the result is the same rows with a float32
  ``score`` column.
- **packed** (``candidates="<list column>"``): each row one query with a list of candidate structs that hold the
  text; the result is the same rows with each list sorted by score (best first), cut to ``top_n``, and every
  candidate given ``score`` and ``rank`` (1 = best). A query's candidates are in one row, so no shuffle is needed.

Stages (``pipelines.engine.ray_data``): an encode stage of CPU tasks (``scale.prepare_cpus`` each, on any node)
tokenises a block of rows, a model stage of actors (``pipelines.engine.pool``: GPUs when the cluster has or can add them)
scores it, a CPU task unpacks the scores. Ray must be running (``ray.init()``); nothing here starts it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import ModelConfig, ScaleConfig
from pipelines.engine.model_stage import ERRORS, SCORES, encode_pairs, from_ipc, ipc_bytes
from pipelines.errors import ConfigError

#: Rows per block of the encode stage when the caller does not say (pairs; packed: queries).
BLOCK_PAIRS = 4096


def rerank_dataset(
    ds: Any,
    model: ModelConfig | dict[str, Any] | str,
    *,
    top_n: int | None = None,
    query: str = "query",
    text: str = "text",
    candidates: str | None = None,
    score: str = "score",
    scale: ScaleConfig | dict[str, Any] | None = None,
    rows_per_batch: int | None = None,
    on_model_error: Literal["fail", "column"] = "fail",
) -> Any:
    """Score a Dataset's pairs with a reranker; see the module docstring for the two row shapes.

    `model`: a ModelConfig, its dict, or a model name or path. `scale`: the pool's settings as in a job's
    ``scale:`` section (num_actors, max_actors, num_gpus_per_actor, num_cpus_per_actor, prepare_cpus, ...).
    `rows_per_batch`: rows tokenised and scored together (default: about 4,096 pairs).
    `on_model_error`: what a pair the model raises on does. fail (default): the dataset fails with the model's
    error (ModelError). column: the error is isolated to the pairs that cause it (their block is scored again in
    halves) and each gets a NaN score and its error's first line in an ``error`` column (pairs: a string column,
    null where scored; packed: an ``error`` field of each candidate, failed candidates ranked last); a model
    that fails on every pair it tries still fails the dataset."""
    from pipelines.engine.pool import model_stage, resolve_pool
    from pipelines.engine.ray_data import TaskStage, apply

    model = _model(model)
    scale = scale if isinstance(scale, ScaleConfig) else ScaleConfig.model_validate(scale or {})
    if top_n is not None and candidates is None:
        raise ConfigError(
            "rerank_dataset: top_n needs packed rows (candidates=<list column>): with one pair per row a query's "
            "candidates may be in any block; group them per query first (e.g. groupby + a list aggregation)"
        )
    if on_model_error not in ("fail", "column"):
        raise ConfigError(f"rerank_dataset: on_model_error must be 'fail' or 'column', got {on_model_error!r}")
    if top_n is not None and top_n < 1:
        raise ConfigError(f"rerank_dataset: top_n must be >= 1, got {top_n}")
    if rows_per_batch is None:
        rows_per_batch = BLOCK_PAIRS if candidates is None else max(1, BLOCK_PAIRS // 64)
    pool = resolve_pool(model, scale)
    kwargs = {"model": model, "query": query, "text": text, "candidates": candidates}
    ds = apply(
        ds,
        TaskStage(
            "encode",
            encode_rows,
            kwargs,
            num_cpus=pool["prepare_cpus"],
            concurrency=pool["prepare_concurrency"],
            batch_size=rows_per_batch,
            retries=scale.unit_retries,
        ),
    )
    ds = apply(ds, model_stage(model, scale, pool, isolate_errors=on_model_error == "column"))
    return apply(
        ds,
        TaskStage(
            "unpack",
            unpack_rows,
            {"score": score, "candidates": candidates, "top_n": top_n, "errors": on_model_error == "column"},
            num_cpus=0.25,
            retries=scale.unit_retries,
        ),
    )


def _model(model: ModelConfig | dict[str, Any] | str) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, str):
        return ModelConfig(name_or_path=model)
    return ModelConfig.model_validate(model)


def encode_rows(batch: pa.Table, *, model: ModelConfig, query: str, text: str, candidates: str | None) -> pa.Table:
    """The encode stage: a block of rows -> one row holding their pairs' model inputs and the rows themselves."""
    for name in (query,) + ((candidates,) if candidates else (text,)):
        if name not in batch.column_names:
            raise ConfigError(f"rerank_dataset: the dataset has no column {name!r} (it has {batch.column_names})")
    queries = batch.column(query).to_pylist()
    if candidates is None:
        texts = batch.column(text).to_pylist()
        pair_queries = queries
    else:
        lists = batch.column(candidates)
        counts = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(lists)
        if not pa.types.is_struct(flat.type) or flat.type.get_field_index(text) < 0:
            raise ConfigError(f"rerank_dataset: {candidates!r} must be a list of structs with a {text!r} field")
        texts = pc.struct_field(flat, text).to_pylist()
        pair_queries = np.repeat(np.asarray(queries, dtype=object), counts).tolist()
    bad = [i for i, (q, t) in enumerate(zip(pair_queries, texts)) if q is None or t is None]
    if bad:
        raise ConfigError(f"rerank_dataset: {len(bad)} pair(s) without a query or text (first at pair {bad[0]})")
    cols = encode_pairs(model, pair_queries, texts)
    cols["_rows"] = ipc_bytes(batch)
    return pa.table({k: pa.array([v], pa.large_binary()) for k, v in cols.items()})


def unpack_rows(
    batch: pa.Table, *, score: str, candidates: str | None, top_n: int | None, errors: bool = False
) -> pa.Table:
    """The last stage: the model stage's rows -> the user's rows with their scores (and errors, when asked)."""
    out = []
    failed_rows = batch.column(ERRORS).to_pylist() if ERRORS in batch.column_names else [""] * batch.num_rows
    for rows, scores, failed in zip(batch.column("_rows").to_pylist(), batch.column(SCORES).to_pylist(), failed_rows):
        table, values = from_ipc(rows), np.frombuffer(scores, dtype=np.float32)
        messages = None
        if errors:
            messages = [None] * len(values)
            for i, line in json.loads(failed or "[]"):
                messages[i] = line
        out.append(
            _with_scores(table, values, score, messages)
            if candidates is None
            else _ranked(table, values, candidates, top_n, messages)
        )
    return pa.concat_tables(out)


def _with_scores(table: pa.Table, scores: np.ndarray, score: str, errors: list[str | None] | None = None) -> pa.Table:
    drop = [c for c in (score, "error" if errors is not None else None) if c in table.column_names]
    table = table.drop_columns(drop).append_column(score, pa.array(scores, pa.float32()))
    return table if errors is None else table.append_column("error", pa.array(errors, pa.string()))


def _ranked(
    table: pa.Table, scores: np.ndarray, candidates: str, top_n: int | None, errors: list[str | None] | None = None
) -> pa.Table:
    """Each row's candidates sorted by score (ties keep their order; NaN, a failed pair, last), cut to top_n, with
    score and rank (and error, when asked)."""
    lists = table.column(candidates).combine_chunks()
    counts = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(lists)
    starts = np.concatenate([[0], np.cumsum(counts)])
    take, ranks, lengths = [], [], []
    for i, n in enumerate(counts):
        order = starts[i] + np.argsort(-scores[starts[i] : starts[i] + n], kind="stable")
        order = order[:top_n] if top_n is not None else order
        take.append(order)
        ranks.append(np.arange(1, len(order) + 1, dtype=np.int32))
        lengths.append(len(order))
    take_idx = pa.array(np.concatenate(take) if take else np.zeros(0, np.int64))
    kept = flat.take(take_idx)
    fields = {f.name: kept.field(f.name) for f in kept.type if f.name not in ("score", "rank", "error")}
    fields["score"] = pa.array(scores[take_idx.to_numpy()] if len(take_idx) else [], pa.float32())
    fields["rank"] = pa.array(np.concatenate(ranks) if ranks else np.zeros(0, np.int32), pa.int32())
    if errors is not None:
        fields["error"] = pa.array([errors[i] for i in take_idx.to_numpy()], pa.string())
    structs = pa.StructArray.from_arrays(list(fields.values()), names=list(fields))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    ranked = pa.ListArray.from_arrays(offsets, structs, mask=lists.is_null())
    return table.set_column(table.column_names.index(candidates), candidates, ranked)
