"""The two stages every reranking pipeline shares, as plain callables on Arrow batches (no Ray here;
``pipelines.engine.ray_data`` runs them):

- **encode** (CPU, any node): (query, text) pairs -> token ids, with the model's truncation, windows and templates
  (``pipelines.model.encoding.PairEncoder``: the tokenizer only, no weights). The ids of a batch of pairs travel as
  one row: int32 ids, their offsets and the pair of each unit, sorted by length, so the model side cuts its
  micro-batches as contiguous slices. Bi-encoders embed whole texts: their pairs travel as text.
- **model** (``ModelStage``, an actor per model copy, GPU or CPU): a row's token ids -> one float32 score per
  pair (``Scorer.score_encoded``: micro-batches of at most ``model.max_batch_tokens`` padded tokens, split on
  device out-of-memory). It drops the token columns and passes every other column of the row through.

A row may carry any other columns (the batch job's unit id, keys and rejects; a user's own rows): the model stage
hands them on untouched.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa

from pipelines.config import ModelConfig

ENCODED = "_encoded"  # pickled Encoded arrays of the row's pairs (cross-encoders, causal-lm)
TEXTS = "_texts"  # Arrow IPC of the row's (query, text) pairs (bi-encoders)
SCORES = "_scores"  # float32 scores of the row's pairs, in pair order
WINDOWS = "_windows"  # model inputs scored (more than pairs with long_text: chunks)
WORKER = ("_node", "_pid", "_retried")  # which model actor scored the row, and whether it redid lost work
ACTOR = "_actor"  # JSON on an actor's first row: when it was ready (epoch s) and its start-up timings


@functools.lru_cache(maxsize=4)
def _encoder(model_json: str):
    from pipelines.model.encoding import PairEncoder

    return PairEncoder(ModelConfig.model_validate_json(model_json))


def encoder_for(model: ModelConfig):
    """The worker process's encoder for this model (loaded once per process: Ray reuses task workers)."""
    return _encoder(model.model_dump_json())


def encode_pairs(model: ModelConfig, queries: list[str], texts: list[str]) -> dict[str, bytes]:
    """The model inputs of these pairs as one row's columns: {ENCODED: ...} or, for bi-encoders, {TEXTS: ...}."""
    encoder = encoder_for(model)
    if not encoder.encodes_pairs:
        return {TEXTS: ipc_bytes(pa.table({"query": pa.array(queries, pa.string()), "text": texts}))}
    enc = encoder.encode(queries, texts)
    return {ENCODED: pickle.dumps(enc.to_arrays(), protocol=5)}


def ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(io.BytesIO(data)).read_all()


class ModelStage:
    """One model copy (a Ray Data actor): scores the rows' pairs, drops their model inputs, keeps the rest.

    Threads: on CPU, torch gets as many threads as the actor reserved CPUs (``num_cpus``; Ray sets
    OMP_NUM_THREADS=1 for fractional actors) unless model.num_threads says otherwise."""

    def __init__(self, model: ModelConfig, num_cpus: float = 1.0, in_flight: int = 2, batch_rows: int = 4096):
        import time

        started = time.perf_counter()
        import torch

        from pipelines.model.scoring import Scorer, default_threads

        if model.num_threads is None and not torch.cuda.is_available():
            torch.set_num_threads(default_threads(num_cpus))
        imported = time.perf_counter()
        self.scorer = Scorer(model)
        self.batch_rows = batch_rows
        self.timings = {
            "actor_imports_s": imported - started,
            "model_load_s": time.perf_counter() - imported,
            "ready_at": time.time(),
        }
        self.node, restarted = "", False
        try:
            import ray

            ctx = ray.get_runtime_context()
            self.node = ctx.get_node_id()
            restarted = bool(ctx.was_current_actor_reconstructed)
        except Exception:  # noqa: BLE001, S110 - not in a Ray actor (a test, a notebook): nothing to record
            pass
        # A restarted actor is first handed the calls its previous life had in flight (Ray retries them before
        # the pool gives it new work): the rows of those are marked as redone.
        self._redo = max(1, in_flight) if restarted else 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores, windows = [], []
        encoded = batch.column(ENCODED).to_pylist() if ENCODED in batch.column_names else [None] * batch.num_rows
        texts = batch.column(TEXTS).to_pylist() if TEXTS in batch.column_names else [None] * batch.num_rows
        for enc, txt in zip(encoded, texts):
            scores.append(self.score_row(enc, txt).tobytes())
            windows.append(self.scorer.last_windows)
        out = batch.drop_columns([c for c in (ENCODED, TEXTS) if c in batch.column_names])
        redo = self._redo > 0
        self._redo -= 1
        n = batch.num_rows
        actor = [json.dumps(self.timings) if self.timings else ""] + [""] * (n - 1)
        self.timings = {}
        return (
            out.append_column(SCORES, pa.array(scores, pa.large_binary()))
            .append_column(WINDOWS, pa.array(windows, pa.int64()))
            .append_column(WORKER[0], pa.array([self.node] * n, pa.string()))
            .append_column(WORKER[1], pa.array([os.getpid()] * n, pa.int64()))
            .append_column(WORKER[2], pa.array([redo] * n, pa.bool_()))
            .append_column(ACTOR, pa.array(actor[:n], pa.string()))
        )

    def score_row(self, encoded: bytes | None, texts: bytes | None) -> np.ndarray:
        if encoded is not None:
            from pipelines.model.encoding import Encoded

            return self.scorer.score_encoded(Encoded.from_arrays(pickle.loads(encoded)))
        if texts is not None:
            pairs = from_ipc(texts)
            queries, passages = pairs.column("query").to_pylist(), pairs.column("text").to_pylist()
            step, windows, out = self.batch_rows, 0, []
            for i in range(0, len(queries), step):
                out.append(self.scorer.score(queries[i : i + step], passages[i : i + step]))
                windows += self.scorer.last_windows
            self.scorer.last_windows = windows
            return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        return np.zeros(0, dtype=np.float32)
