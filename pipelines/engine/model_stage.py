"""The two stages every reranking pipeline shares, as plain callables on Arrow batches (no Ray here;
``pipelines.engine.ray_data`` runs them):

- **encode** (CPU, any node): (query, text) pairs -> token ids, with the model's truncation, windows and templates
  (``pipelines.model.encoding.PairEncoder``: the tokenizer only, no weights). The ids of a batch of pairs travel as
  one row: int32 ids, their offsets and the pair of each unit, sorted by length, so the model side cuts its
  micro-batches as contiguous slices. Bi-encoders embed whole texts: their pairs travel as text.
- **model** (``ModelStage``, an actor per model copy, GPU or CPU): a row's token ids -> one float32 score per
  pair (``Scorer.score_encoded``: micro-batches of at most ``model.max_batch_tokens`` padded tokens, split on
  device out-of-memory). It drops the token columns and passes every other column of the row through.
  A model error on a row is isolated by scoring it again in halves, down to the pairs that fail (poison pairs):
  they get a NaN score and their error's first line in ``ERRORS``; a model that fails on every pair it tries,
  having never scored one, raises `ModelError` with its own message (a broken model fails the job at once).

A row may carry any other columns (the batch job's unit id, keys and rejects; a user's own rows): the model stage
hands them on untouched.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import pickle

import numpy as np
import pyarrow as pa

from pipelines.config import ModelConfig
from pipelines.errors import RerankError

log = logging.getLogger(__name__)

ENCODED = "_encoded"  # pickled Encoded arrays of the row's pairs (cross-encoders, causal-lm)
TEXTS = "_texts"  # Arrow IPC of the row's (query, text) pairs (bi-encoders)
SCORES = "_scores"  # float32 scores of the row's pairs, in pair order
WINDOWS = "_windows"  # model inputs scored (more than pairs with long_text: chunks)
WORKER = ("_node", "_pid", "_retried")  # which model actor scored the row, and whether it redid lost work
ACTOR = "_actor"  # JSON on an actor's first row: when it was ready (epoch s) and its start-up timings
ERRORS = "_errors"  # JSON [[pair index, "Error: first line"], ...]: the row's pairs the model failed on

#: Pairs that fail, one by one, before an actor that never scored a pair calls its model broken (a row whose every
#: pair fails is enough too).
BROKEN_AFTER = 64


class ModelError(RerankError):
    """The model fails on every pair it is given (a broken model, not a poison pair): the job stops with its message."""


def error_line(err: BaseException) -> str:
    """An exception's type and the first line of its message (what a reject's detail holds)."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


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

    def __init__(
        self,
        model: ModelConfig,
        num_cpus: float = 1.0,
        in_flight: int = 2,
        batch_rows: int = 4096,
        isolate_errors: bool = True,
    ):
        import time

        started = time.perf_counter()
        import torch

        from pipelines.model.scoring import Scorer, default_threads

        if model.num_threads is None and not torch.cuda.is_available():
            torch.set_num_threads(default_threads(num_cpus))
        imported = time.perf_counter()
        self.scorer = Scorer(model)
        self.batch_rows = batch_rows
        #: isolate a model error to the pairs that cause it (else raise it as ModelError at once)
        self.isolate_errors = isolate_errors
        self.pairs_scored = 0  # by this actor, in its life: a model that has scored none and fails is broken
        self.timings = {
            "actor_imports_s": imported - started,
            "model_load_s": time.perf_counter() - imported,
            "ready_at": time.time(),
        }
        self.node, restarted = "", False
        try:
            import ray

            if not ray.is_initialized():  # a test or a notebook: asking for the context would start Ray
                raise RuntimeError("not in Ray")
            ctx = ray.get_runtime_context()
            self.node = ctx.get_node_id()
            restarted = bool(ctx.was_current_actor_reconstructed)
        except Exception:  # noqa: BLE001, S110 - not in a Ray actor (a test, a notebook): nothing to record
            pass
        # A restarted actor is first handed the calls its previous life had in flight (Ray retries them before
        # the pool gives it new work): the rows of those are marked as redone.
        self._redo = max(1, in_flight) if restarted else 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores, windows, errors = [], [], []
        encoded = batch.column(ENCODED).to_pylist() if ENCODED in batch.column_names else [None] * batch.num_rows
        texts = batch.column(TEXTS).to_pylist() if TEXTS in batch.column_names else [None] * batch.num_rows
        uids = batch.column("uid").to_pylist() if "uid" in batch.column_names else [None] * batch.num_rows
        for enc, txt, uid in zip(encoded, texts, uids):
            row_scores, failed = self.score_row(enc, txt, uid)
            scores.append(row_scores.tobytes())
            windows.append(self.scorer.last_windows)
            errors.append(json.dumps(failed) if failed else "")
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
            .append_column(ERRORS, pa.array(errors, pa.string()))
        )

    def score_row(
        self, encoded: bytes | None, texts: bytes | None, uid: bytes | str | None = None
    ) -> tuple[np.ndarray, list[list]]:
        """A row's scores, float32 per pair, and the pairs the model failed on: [[pair index, error line], ...]
        (their scores NaN)."""
        if encoded is not None:
            from pipelines.model.encoding import Encoded

            enc = Encoded.from_arrays(pickle.loads(encoded))
            return self._isolated(
                enc.n_pairs,
                lambda idx: self.scorer.score_encoded(enc if idx is None else enc.subset(idx)),
                lambda: self.scorer.last_windows,
                uid,
            )
        if texts is not None:
            pairs = from_ipc(texts)
            queries, passages = pairs.column("query").to_pylist(), pairs.column("text").to_pylist()

            def score(idx: np.ndarray | None) -> np.ndarray:
                q = queries if idx is None else [queries[i] for i in idx]
                p = passages if idx is None else [passages[i] for i in idx]
                step, out, self._bi_windows = self.batch_rows, [], 0
                for i in range(0, len(q), step):
                    out.append(self.scorer.score(q[i : i + step], p[i : i + step]))
                    self._bi_windows += self.scorer.last_windows
                return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

            return self._isolated(len(queries), score, lambda: self._bi_windows, uid)
        return np.zeros(0, dtype=np.float32), []

    def _isolated(self, n: int, score, windows, uid) -> tuple[np.ndarray, list[list]]:
        """score(None) for all n pairs; if the model raises, the pairs are scored again in halves (and so on) down
        to the pairs it fails on, which come back NaN with their error. A model that fails on BROKEN_AFTER pairs
        one by one (or on every pair of the row) without ever having scored one is broken: ModelError."""
        out = np.full(n, np.nan, dtype=np.float32)
        if n == 0:
            return out, []
        failed: list[list] = []
        total_windows = 0
        todo = [np.arange(n)]
        whole = True
        while todo:
            idx = todo.pop()
            try:
                out[idx] = score(None if whole else idx)
                total_windows += windows()
                self.pairs_scored += len(idx)
            except Exception as err:  # noqa: BLE001 - a model error on these pairs: isolate it
                if not self.isolate_errors:
                    raise ModelError(f"the model failed{_where(uid)}: {error_line(err)}") from None
                if len(idx) > 1:
                    half = len(idx) // 2
                    todo += [idx[half:], idx[:half]]
                else:
                    failed.append([int(idx[0]), error_line(err)])
                    if self.pairs_scored == 0 and (len(failed) >= BROKEN_AFTER or len(failed) == n > 1):
                        raise ModelError(
                            f"the model fails on every pair it is given ({len(failed)} tried one by one{_where(uid)}, "
                            f"none scored): {error_line(err)}"
                        ) from None
            whole = False
        self.scorer.last_windows = total_windows
        if failed:
            failed.sort()
            log.warning(
                "rerank: the model failed on %d of %d pairs%s (rejected as model_error); first: pair %d, %s",
                len(failed), n, _where(uid), failed[0][0], failed[0][1],
            )  # fmt: skip
        return out, failed


def _where(uid: bytes | str | None) -> str:
    if uid is None:
        return ""
    return f" of unit {uid.decode() if isinstance(uid, bytes) else uid}"
