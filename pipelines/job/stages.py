"""The batch job's own stages around the shared model stage (``pipelines.engine.model_stage.ModelStage``):

- ``read_units`` (CPU tasks, any node): a chain of units (the slices of one large row group, or one unit) ->
  per unit one row: its rows read (only the job's columns), bad rows rejected with a reason, duplicate pairs
  dropped, the rest tokenised (``pipelines.engine.model_stage.encode_pairs``), with the unit's keys, rejects and counts.
  A chain is read by one task, slice after slice, so each row is decoded once.
- the model stage scores the row;
- ``commit_units`` (CPU tasks): scores -> pairs the model failed on rejected (model_error, with the error line
  as detail) -> non-finite scores rejected -> the top-N of every query the unit holds
  (a query's global top-N is among the union of these) -> the unit's commit: its partial top-N, its rejects and
  its record, under names fixed by the unit (``pipelines.io.commit``). A retried or resumed unit rewrites the same
  files; a unit without a commit record is redone. Right before it writes, it reads the output's lease: a run
  whose output was taken over by another run commits nothing more (``pipelines.io.lease.check_held``).

No Ray here: ``pipelines.engine.ray_data`` runs these as Ray Data stages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import ModelConfig, StorageConfig
from pipelines.engine.model_stage import ACTOR, ERRORS, SCORES, WINDOWS, WORKER, encode_pairs, from_ipc, ipc_bytes
from pipelines.io import rows as records
from pipelines.io.commit import Progress
from pipelines.io.lease import check_held
from pipelines.io.rows import PACKED, InputLayout
from pipelines.io.storage import Storage
from pipelines.io.units import Unit, UnitReader
from pipelines.job.link import NO_LINK, CascadeLink
from pipelines.job.reduce import parquet_bytes
from pipelines.job.store import StoreSpec, commit_store, lookup_unit
from pipelines.job.summary import JobError


@dataclass(frozen=True)
class UnitSpec:
    """What the job's stages need to read and commit units; small, so Ray passes it inline."""

    model: ModelConfig
    layout: InputLayout
    storage: StorageConfig
    input_protocol_uri: str
    output_uri: str
    top_n: int
    max_text_bytes: int
    corpus: bool
    corpus_packed: bool = False  # joined input made from packed candidates (rows marked _no_candidates)
    lease_token: str | None = None  # the run's lease of the output: a unit commits only while the run still holds it
    link: CascadeLink = NO_LINK  # a cascade's stage: what it carries to its output
    score_store: StoreSpec | None = None  # output.score_store's namespace for this model: reuse and keep scores


def chains_of(units: list[Unit]) -> list[list[Unit]]:
    """Units grouped in chains (a large row group's slices, in order; any other unit alone), in input order."""
    chains: dict[str, list[Unit]] = {}
    for u in units:
        chains.setdefault(u.chain or u.uid, []).append(u)
    return list(chains.values())


def read_units(batch: pa.Table, *, spec: UnitSpec) -> Iterator[pa.Table]:
    """The CPU stage: each input row is a chain of units (JSON); yields one row per unit."""
    reader = UnitReader(Storage.for_uri(spec.input_protocol_uri, spec.storage))
    try:
        for chain in batch.column("chain").to_pylist():
            for unit in (Unit.from_list(u) for u in json.loads(chain)):
                yield _read_unit(unit, spec, reader)
    finally:
        reader.close()


def _read_unit(unit: Unit, spec: UnitSpec, reader: UnitReader) -> pa.Table:
    layout = spec.layout
    decoded_before = reader.rows_decoded
    if layout.layout == PACKED:
        table = reader.read(unit, ["query_id", "query", "candidates"])
        rows_read = table.num_rows
        pairs, empty = records.explode_packed(table, layout)
        rejects = [empty]
    else:
        flags = ["_no_candidates"] if spec.corpus_packed else []
        columns = records.pair_columns(layout, with_text=True)
        carried = [src for src, _ in spec.link.carry if src not in columns]  # an earlier stage's score columns
        pairs = reader.read(unit, columns + flags + carried)
        rows_read = pairs.num_rows
        rejects = []
    pairs_in = pairs.num_rows + sum(r.num_rows for r in rejects)
    valid, bad = records.split_rejects(pairs, layout, spec.max_text_bytes, corpus=spec.corpus)
    valid, dup = records.split_duplicates(valid, layout)
    rejects += [bad, dup]
    keep = ["query_id", "doc_id"] + (["first_stage_rank"] if layout.has_first_stage_rank else [])
    kept = valid.select(keep)
    for src, dst in spec.link.carry:  # to the output, under the stage's names
        kept = kept.append_column(dst, valid.column(src).cast(spec.link.carried_types[dst]))
    record = {
        "uid": unit.uid,
        "pairs_in": pairs_in,
        "rows": rows_read,
        "rows_decoded": reader.rows_decoded - decoded_before,  # > rows: rows decoded again to reach a slice
    }
    reused = None
    if spec.score_store is not None:  # pairs found in the store are neither tokenised nor scored
        valid, kept, reused, record["store"] = lookup_unit(spec.score_store, valid, kept)
        record["pairs_reused"] = reused.num_rows
    row: dict[str, Any] = encode_pairs(spec.model, valid.column("query").to_pylist(), valid.column("text").to_pylist())
    row |= {
        "uid": unit.uid.encode(),
        "record": json.dumps(record).encode(),
        "keys": ipc_bytes(kept),
        "rejects": ipc_bytes(pa.concat_tables([r.cast(layout.reject_schema) for r in rejects])),
    }
    if reused is not None:
        row["reused"] = ipc_bytes(reused)
    return pa.table({k: pa.array([v], pa.large_binary()) for k, v in row.items()})


def commit_units(batch: pa.Table, *, spec: UnitSpec) -> pa.Table:
    """The commit stage: each scored row -> the unit's files and commit record; returns the records (JSON) and
    the model actor's start-up timings on its first row (``pipelines.engine.model_stage.ACTOR``)."""
    out = Storage.for_uri(spec.output_uri, spec.storage)
    progress = Progress(out, out.path(spec.output_uri))
    done, actor = [], []
    for i in range(batch.num_rows):
        row = {name: batch.column(name)[i].as_py() for name in batch.column_names}
        done.append(json.dumps(_commit(row, spec, progress)))
        actor.append(row.get(ACTOR) or "")
    return pa.table({"record": pa.array(done, pa.string()), "actor": pa.array(actor, pa.string())})


def _commit(row: dict[str, Any], spec: UnitSpec, progress: Progress) -> dict[str, Any]:
    layout = spec.layout
    record = json.loads(row["record"])
    keys, rejected = from_ipc(row["keys"]), from_ipc(row["rejects"])
    scores = np.frombuffer(row[SCORES], dtype=np.float32)
    if len(scores) != keys.num_rows:
        raise JobError(f"unit {record['uid']}: {keys.num_rows} pairs to score but {len(scores)} scores came back")
    scored = keys.append_column("score", pa.array(scores, pa.float32()))
    scored, model_errors = records.split_model_errors(scored, json.loads(row.get(ERRORS) or "[]"), layout)
    scored, non_finite = records.split_non_finite(scored, layout)
    rejected = pa.concat_tables([rejected, model_errors, non_finite.cast(layout.reject_schema)])
    if spec.score_store is not None:  # new scores into the store before the unit commits; reused ones back in
        scored, written = commit_store(spec.score_store, scored, from_ipc(row["reused"]))
        looked = record.setdefault("store", {})
        for key, value in written.items():
            looked[key] = looked.get(key, 0) + value
    reused = record.get("pairs_reused", 0)
    top = records.top_n_per_query(scored, spec.top_n, with_rank=False)
    by_reason = {item["values"]: item["counts"] for item in pc.value_counts(rejected.column("reason")).to_pylist()}
    record |= {
        "pairs_scored": scored.num_rows - reused,  # by the model; reused ones came from the store
        "windows_scored": int(row[WINDOWS]),
        "rejected": dict(sorted(by_reason.items())),
        "partial_rows": top.num_rows,
        "rejected_rows": rejected.num_rows,
        "node": row[WORKER[0]],  # the model actor that scored it (and its process: which one, when chasing it)
        "pid": row[WORKER[1]],
        "committed_by": os.getpid(),
    }
    if row[WORKER[2]]:
        record["retried"] = True
    if record["pairs_in"] != scored.num_rows + rejected.num_rows:
        raise JobError(
            f"unit {record['uid']}: {record['pairs_in']} pairs in but {scored.num_rows} scored + "
            f"{rejected.num_rows} rejected"
        )
    partial = parquet_bytes(top) if top.num_rows else None
    record["partial_bytes"] = len(partial) if partial is not None else 0
    rejects = parquet_bytes(rejected) if rejected.num_rows else None
    if spec.lease_token is not None:  # a run whose output was taken over by another writes nothing more there
        check_held(progress, spec.lease_token)
    progress.commit_unit(record["uid"], partial, rejects, record)
    return record
