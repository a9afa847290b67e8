"""The model: one Scorer for the batch job, the service and the evaluation, so their scores agree.

No Ray here. A Scorer is two pieces:

1. encode (pipelines.model.encoding.PairEncoder, ``scorer.encoder``): tokenizer and AutoConfig only, no weights. Each
   pair becomes one or more units of token ids (a pair truncated, or, with ``long_text: chunks``, one unit per
   window of a long passage), stored unpadded and sorted by length in an `Encoded`. A CPU stage (Ray Data tasks)
   can run it on its own; the truncation rules are documented there.
2. the model side (``score_encoded``): a backend of pipelines.model.backends (torch, ONNX Runtime or OpenVINO; causal-lm
   rerankers on torch) loaded once. The length-sorted units are cut into micro-batches as contiguous slices,
   filled up to a token budget (rows x the longest <= max_batch_tokens, rows <= batch_size), padded with a few
   vectorised numpy operations into int32 ids / mask (/ token types) and run; a call's outputs are gathered with
   one device-to-host copy. The units of a pair are then reduced to one row of logits (max / first / mean of its
   windows) and ``from_logits`` turns a row into a score.

``score(queries, passages)`` runs both in one process: pairs are encoded block by block on a background thread
(HF fast tokenizers release the GIL), one block ahead of the model, so tokenisation overlaps the forward passes;
``score_encoded(PairEncoder(config).encode(queries, passages))`` gives the same scores.

The bi-encoder path (``embed``, and ``score`` as the cosine of embeddings) stays here: its texts are encoded one
by one (encoding.TextEncoder), each distinct passage once, and run by the same model side.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipelines.errors import ConfigError
from pipelines.model import backends
from pipelines.model.encoding import (  # noqa: F401 - label_token_ids, load_tokenizer_and_labels: re-exported
    Encoded,
    PairEncoder,
    label_token_ids,
    load_tokenizer_and_config,
    load_tokenizer_and_labels,
    model_fingerprint,
)

if TYPE_CHECKING:  # annotations only: jobs/gpu_check.py runs the Scorer without pydantic
    from pipelines.config import ModelConfig

log = logging.getLogger(__name__)

#: Most pairs tokenised per step of the pipeline: the background thread tokenises block k+1 while the model runs
#: block k. Pairs are sorted by length within a block, so larger blocks pad less and overlap later.
BLOCK_ROWS = 1024
MIN_BLOCK_ROWS = 256


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {device!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return dev


@dataclass(frozen=True)
class ModelInfo:
    """What the summary and the service report about the model actually loaded."""

    name_or_path: str
    kind: str
    revision: str
    num_labels: int | None
    device: str
    dtype: str
    backend: str = "torch"
    max_batch_tokens: int = 0
    #: What model.backend / model.dtype auto chose and why (backends.resolve_auto); None when neither was auto.
    backend_choice: dict | None = None


def max_batch_tokens(config: ModelConfig, device: torch.device | None, hf_config=None) -> int | str:
    """model.max_batch_tokens as a number: the integer given, or auto: backends.default_max_batch_tokens (CPU: 2048;
    a GPU: from its free memory now and the model's size, so call it before the weights load). A GPU this process
    cannot see (a driver planning for GPU workers) is left to each worker: "auto"."""
    if config.max_batch_tokens != "auto":
        return int(config.max_batch_tokens)
    if device is not None and device.type == "cuda":
        if not torch.cuda.is_available():
            return "auto"
        if hf_config is None:
            hf_config = load_tokenizer_and_config(config)[1]
    return backends.default_max_batch_tokens(device, hf_config, config.dtype)


def describe_model(config: ModelConfig, on_cluster: bool = False) -> dict:
    """Name, kind and revision (or content hash) of a model, validated but not loaded: an unsupported
    backend/dtype/device combination is a ConfigError here, before any cluster time is spent. On a cluster
    (`on_cluster`: the caller joins one; see backends.planned_device) with model.device auto, the device-specific part waits for the
    actors' device (the batch job checks it once their GPUs are known)."""
    device = backends.planned_device(config, on_cluster)
    backends.check_model_on(config, device)
    _, hf_config, num_labels = load_tokenizer_and_config(config)
    choice = None
    if "auto" in (config.backend, config.dtype):
        if device is None:  # each actor resolves it on its own device and CPU
            choice = {"requested": f"{config.backend}/{config.dtype}", "reason": "resolved by each actor on its device"}
        else:
            resolved, choice = backends.resolve_auto(config, device)
            backends.log_choice(choice)
            config = resolved
    elif device is not None and config.backend in backends.EXPORTED_BACKENDS:  # remote code: torch (resolve_auto)
        config, choice = backends.resolve_auto(config, device)
        backends.log_choice(choice)
    out = {
        "name_or_path": config.name_or_path,
        "kind": config.kind,
        "revision": model_fingerprint(config.name_or_path, config.revision),
        "num_labels": num_labels,
        "backend": config.backend,
        "dtype": config.dtype,
        "max_length": config.max_length,
        "device": str(device) if device else "auto (the actors')",
        "max_batch_tokens": max_batch_tokens(config, device, hf_config) if device else config.max_batch_tokens,
    }
    if choice is not None:
        out["backend_choice"] = choice
    return out


def cut_micro_batches(lengths: np.ndarray, budget: int, cap: int) -> list[tuple[int, int]]:
    """[start, end) slices of units sorted longest first: each is filled while (rows x its first, longest length)
    stays within `budget` padded tokens and rows within `cap`. A unit longer than the budget runs alone."""
    out, start, n = [], 0, len(lengths)
    while start < n:
        rows = max(1, min(cap, budget // max(1, int(lengths[start]))))
        out.append((start, min(n, start + rows)))
        start += rows
    return out


def pad_units(
    enc: Encoded, start: int, end: int, pad_id: int, left: bool, with_types: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Units [start, end) of `enc` (longest first) as padded int32 (ids, mask, types or None), width the first
    unit's length; left-padded with `left`. No per-row loop: the mask is a broadcast comparison and the tokens go
    in with one boolean-mask assignment (row-major, which is the concatenated order)."""
    lens = enc.offsets[start + 1 : end + 1] - enc.offsets[start:end]
    width = int(lens.max()) if len(lens) else 0
    cols = np.arange(width)
    real = cols >= (width - lens)[:, None] if left else cols < lens[:, None]
    a, b = int(enc.offsets[start]), int(enc.offsets[end])
    ids = np.full((len(lens), width), pad_id, dtype=np.int32)
    ids[real] = enc.ids[a:b]
    types = None
    if with_types and enc.types is not None:
        types = np.zeros((len(lens), width), dtype=np.int32)
        types[real] = enc.types[a:b]
    return ids, real.astype(np.int32), types


class Scorer:
    """Scores (query, passage) pairs with a cross-encoder, a causal-LM reranker or a bi-encoder.

    >>> scorer = Scorer(ModelConfig(name_or_path="cross-encoder/ms-marco-MiniLM-L6-v2"))
    >>> scorer.score(["what is ray"], ["Ray is a framework for scaling Python."])
    """

    def __init__(self, config: ModelConfig):
        self.device = resolve_device(config.device)
        #: model.backend / model.dtype auto resolved for this device and CPU (backends.resolve_auto): self.config
        #: holds the concrete pair, self.backend_choice what was asked and why this (None without auto).
        config, self.backend_choice = backends.resolve_auto(config, self.device)
        backends.log_choice(self.backend_choice)
        self.config = config
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        #: The tokenizer side, the same object a CPU stage builds with PairEncoder(config).
        self.encoder: PairEncoder = PairEncoder(config)
        self.tokenizer = self.encoder.tokenizer
        self.num_labels: int | None = self.encoder.num_labels
        self.max_length: int = self.encoder.max_length
        # On a GPU the budget comes from its free memory: read before the weights take their share.
        self.max_batch_tokens = max_batch_tokens(config, self.device, self.encoder.hf_config)
        self.backend: backends.Backend = backends.load_backend(config, self.device, self.tokenizer, self.max_length)
        # An onnx/openvino export that failed or differed from torch: torch runs it (logged); report what runs.
        self.config, self.backend_choice = backends.backend_used(config, self.backend_choice, self.backend)
        self.encoder.adapt_model_config(self.backend.hf_config)
        #: units (windows; one per pair unless long_text is chunks) the last score()/logits() call scored
        self.last_windows = 0
        self._passage_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._tokenize_pool: ThreadPoolExecutor | None = None
        self._forward_lock = threading.Lock()
        self.stats = {"forward_passes": 0, "rows": 0, "tokens": 0, "padded_tokens": 0, "oom_splits": 0}

    @property
    def max_query_length(self) -> int:
        return self.encoder.max_query_length

    @property
    def budget(self) -> int:
        """Tokens a query and a passage share in one pair (max_length less the special or template tokens)."""
        return self.encoder.budget

    @functools.cached_property
    def info(self) -> ModelInfo:
        """Computed on first use: the fingerprint of a local folder hashes its files, which batch actors never
        need (the job's driver records it once)."""
        return ModelInfo(
            name_or_path=self.config.name_or_path,
            kind=self.config.kind,
            revision=model_fingerprint(self.config.name_or_path, self.config.revision),
            num_labels=self.num_labels,
            device=str(self.device),
            dtype=self.config.dtype,
            backend=self.config.backend,
            max_batch_tokens=self.max_batch_tokens,
            backend_choice=self.backend_choice,
        )

    # ------------------------------------------------------------------ public API

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """Scores aligned lists of queries and passages, model.activation applied; float32 of the same length."""
        if not self.encoder.encodes_pairs:
            q, p = self.encoder.format(queries, passages)
            self.last_windows = len(q)
            return self._score_bi(q, p) if q else np.zeros(0, dtype=np.float32)
        return self.from_logits(self.logits(queries, passages))

    def logits(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """A pair model's logits, float32 [n, num_labels] (causal-lm: [n, 1], logit(yes) - logit(no)), windows
        already reduced to one row per pair; `from_logits` turns them into scores."""
        self._needs_pairs("logits()")
        q, p = self.encoder.format(queries, passages)
        out = np.empty((len(q), self._width), dtype=np.float32)
        windows = 0

        def run(start: int, end: int, enc: Encoded) -> None:
            nonlocal windows
            out[start:end] = self._logits_encoded(enc)
            windows += enc.n_units

        self._pipelined(len(q), lambda s, e: self.encoder.encode_formatted(q[s:e], p[s:e]), run)
        self.last_windows = windows
        return out

    def score_encoded(self, enc: Encoded) -> np.ndarray:
        """The model stage: float32 score per pair of `enc` (from PairEncoder.encode, here or in another process),
        model.activation applied, windows reduced; sets last_windows."""
        return self.from_logits(self.logits_encoded(enc))

    def logits_encoded(self, enc: Encoded) -> np.ndarray:
        """`logits` of pairs already encoded: float32 [n_pairs, num_labels] (causal-lm: [n_pairs, 1])."""
        self._needs_pairs("score_encoded()")
        self.last_windows = enc.n_units
        return self._logits_encoded(enc)

    def from_logits(self, logits: np.ndarray, activation: str | None = None) -> np.ndarray:
        """Scores from logits: the logit (of the positive class for 2 labels), or with activation "sigmoid" a
        probability (softmax of the positive class for 2 labels; P(yes) over yes and no for causal-lm).
        Defaults to model.activation."""
        activation = activation or self.config.activation
        logits = np.asarray(logits, dtype=np.float32)
        if self.num_labels == 1:
            score = logits[:, 0]
            return _sigmoid(score) if activation == "sigmoid" else score
        return _sigmoid(logits[:, 1] - logits[:, 0]) if activation == "sigmoid" else logits[:, 1]

    def rank(self, query: str, passages: Sequence[str], top_n: int | None = None) -> list[tuple[int, float]]:
        """(index, score) pairs best first; ties keep input order."""
        scores = self.score([query] * len(passages), passages)
        order = np.argsort(-scores, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        return [(int(i), float(scores[i])) for i in order]

    def first_cut(self, query: str, texts: Sequence[str], tokenizer=None) -> tuple[int, int, int] | None:
        """The first (query, text) pair of which scoring would cut something, as (index, tokens the whole pair
        needs, model's limit); index -1 when it is the query that would be cut. With long_text: chunks a long
        passage is windowed, not cut, so only the query counts. None when nothing would be cut. For the service's
        APIs that refuse rather than cut (TEI, NIM); `tokenizer` lets it check on its own thread."""
        return self.encoder.first_cut(query, texts, tokenizer=tokenizer)

    def _needs_pairs(self, what: str) -> None:
        if not self.encoder.encodes_pairs:
            raise ConfigError(f"{what} needs model.kind: cross-encoder or causal-lm")

    @property
    def _width(self) -> int:
        return self.num_labels or 1

    # Kept for jobs/benchmark.py: the units of formatted pairs, and the ids of single texts.
    def _encode(self, queries: Sequence[str], passages: Sequence[str]) -> Encoded:
        return self.encoder.encode_formatted(list(queries), list(passages))

    def _encode_texts(self, texts: list[str], max_length: int) -> dict[str, list[list[int]]]:
        enc = self.tokenizer(texts, truncation=True, max_length=max_length, padding=False)
        return {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}

    # ------------------------------------------------------------------ the model side: units -> rows

    def _logits_encoded(self, enc: Encoded) -> np.ndarray:
        if enc.n_pairs == 0:
            return np.zeros((0, self._width), dtype=np.float32)
        return self._reduce(self._forward_units(enc), enc)

    def _forward_units(self, enc: Encoded) -> np.ndarray:
        """The model's features of every unit of `enc`, in its stored order: [units, d]. Micro-batches are
        contiguous slices of the length-sorted units (cut_micro_batches, at the budget current when each is cut:
        an out-of-memory split lowers it for the rest), padded by pad_units; their outputs stay on the device
        and are gathered with one to_host."""
        lengths = enc.lengths
        if len(lengths) > 1 and bool(np.any(lengths[1:] > lengths[:-1])):  # not from PairEncoder: sort a copy
            order = np.argsort(-lengths, kind="stable")
            rows = self._forward_units(_reordered(enc, order))
            out = np.empty_like(rows)
            out[order] = rows
            return out
        pad_id, left = self.encoder.pad_token_id, self.encoder.padding_side == "left" and self.backend.pads_left
        with_types = enc.types is not None and self.backend.uses_token_type_ids
        parts: list = []
        start, n = 0, len(lengths)
        st = self.stats
        while start < n:
            rows = max(1, min(self.config.batch_size, self.max_batch_tokens // max(1, int(lengths[start]))))
            end = min(n, start + rows)
            ids, mask, types = pad_units(enc, start, end, pad_id, left, with_types)
            st["forward_passes"] += 1
            st["rows"] += len(ids)
            st["tokens"] += int(enc.offsets[end] - enc.offsets[start])
            st["padded_tokens"] += ids.size
            with self._forward_lock:
                parts.extend(self._forward_or_split(ids, mask, types))
            start = end
        return self.backend.to_host(parts)

    def _forward_or_split(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None) -> list:
        """One micro-batch through the model -> its output parts, in row order. On a device out-of-memory error
        the batch is split in halves and each half run on its own (down to one row, whose error is raised), and
        the token budget of later batches drops below what failed: scores do not depend on the batch a pair is in,
        so the result is the same."""
        try:
            return [self.backend.forward_device(ids, mask, types)]
        except Exception as err:  # only an out-of-memory error is handled; the rest is raised again
            if not _is_out_of_memory(err) or len(ids) <= 1:
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.max_batch_tokens = max(1, min(self.max_batch_tokens, ids.size // 2))
        self.stats["oom_splits"] += 1
        if self.stats["oom_splits"] == 1:
            log.warning(
                "out of device memory on a batch of %d x %d tokens: split in halves and retried; later batches "
                "hold at most %d padded tokens (set model.max_batch_tokens to start there)",
                ids.shape[0],
                ids.shape[1],
                self.max_batch_tokens,
            )
        half = len(ids) // 2
        out: list = []
        for p in (slice(0, half), slice(half, len(ids))):
            out.extend(self._forward_or_split(ids[p], mask[p], types[p] if types is not None else None))
        return out

    def _reduce(self, rows: np.ndarray, enc: Encoded) -> np.ndarray:
        """One row per pair, in pair order: a pair's only unit, or for windowed pairs the row of its best window
        by raw score (max; the first window of a tie), its first window (first), or the mean of its windows'
        logits (mean). The [0, 1] score is then the activation of that row, so raw and [0, 1] scores come from
        the same window. Units are in length order; a pair's windows keep their order among them (encoding)."""
        pair, n = enc.unit_pair, enc.n_pairs
        out = np.empty((n, rows.shape[1]), dtype=np.float32)
        if len(rows) == n:
            out[pair] = rows
            return out
        how = self.config.chunk_aggregate
        if how == "mean":
            sums = np.zeros((n, rows.shape[1]), dtype=np.float64)
            np.add.at(sums, pair, rows)
            return (sums / np.bincount(pair, minlength=n)[:, None]).astype(np.float32)
        position = np.arange(len(rows))
        if how == "max":
            order = np.lexsort((position, -self.from_logits(rows, "none"), pair))
        else:  # first
            order = np.lexsort((position, pair))
        grouped = pair[order]
        head = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        out[grouped[head]] = rows[order[head]]
        return out

    def _pipelined(self, n: int, encode: Callable[[int, int], Encoded], run: Callable[[int, int, Encoded], None]):
        """run(start, end, encode(start, end)) for consecutive blocks of [0, n), in order. Blocks are encoded on a
        background thread (HF fast tokenizers release the GIL), one block ahead of the model, so tokenisation
        overlaps the forward passes."""
        if n == 0:
            return
        if self._tokenize_pool is None:
            # One thread: a fast tokenizer must not be used by two threads at once.
            self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-tokenize")
        pending: deque = deque()
        # At least two blocks from 512 items on, so a call of a few hundred pairs overlaps too.
        block = min(BLOCK_ROWS, max(MIN_BLOCK_ROWS, -(-n // 2)))
        starts = iter(range(0, n, block))

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                end = min(n, start + block)
                pending.append((start, end, self._tokenize_pool.submit(encode, start, end)))

        submit()
        submit()
        while pending:
            start, end, future = pending.popleft()
            enc = future.result()
            submit()
            run(start, end, enc)

    # ------------------------------------------------------------------ bi-encoder

    def embed(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings (bi-encoder models), float32 [n, dim]."""
        if self.encoder.encodes_pairs:
            raise ConfigError("embed() needs model.kind: bi-encoder")
        texts = list(texts)
        limit = max_length or self.max_length
        out = np.empty((len(texts), self.backend.hf_config.hidden_size), dtype=np.float32)

        def run(start: int, end: int, enc: Encoded) -> None:
            out[start + enc.unit_pair] = self._forward_units(enc)

        self._pipelined(len(texts), lambda s, e: self.encoder.encode_texts(texts[s:e], limit), run)
        return out

    def _score_bi(self, queries: list[str], passages: list[str]) -> np.ndarray:
        # A passage's embedding does not depend on the query: embed each distinct text once, and keep recent
        # ones, since the same chunk is a candidate of many queries.
        unique_q = list(dict.fromkeys(queries))
        q_emb = self.embed(unique_q, max_length=self.max_query_length)
        unique_p = list(dict.fromkeys(passages))
        missing = [p for p in unique_p if p not in self._passage_cache]
        fresh = dict(zip(missing, self.embed(missing))) if missing else {}
        p_emb = np.stack([fresh[p] if p in fresh else self._passage_cache[p] for p in unique_p])
        for p in unique_p:
            self._remember(p, fresh.get(p))
        q_rows = _positions(queries, unique_q)
        p_rows = _positions(passages, unique_p)
        return np.einsum("ij,ij->i", q_emb[q_rows], p_emb[p_rows]).astype(np.float32)

    def _remember(self, passage: str, embedding: np.ndarray | None) -> None:
        cache, limit = self._passage_cache, self.config.embedding_cache
        if limit <= 0:
            return
        if embedding is None:
            if passage in cache:  # it may have been evicted by this very batch
                cache.move_to_end(passage)
            return
        cache[passage] = embedding
        if len(cache) > limit:
            cache.popitem(last=False)


def _reordered(enc: Encoded, order: np.ndarray) -> Encoded:
    """`enc` with its units in `order`."""
    lengths = enc.lengths[order]
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    take = np.arange(offsets[-1], dtype=np.int64) + np.repeat(enc.offsets[:-1][order] - offsets[:-1], lengths)
    types = enc.types[take] if enc.types is not None else None
    return Encoded(enc.ids[take], offsets, types, enc.unit_pair[order], enc.n_pairs)


def _is_out_of_memory(err: BaseException) -> bool:
    """A device out-of-memory error: torch's (CUDA, MPS) or one a runtime reports in its message."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function, float32."""
    return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))).astype(np.float32)


def _positions(items: list[str], unique: list[str]) -> np.ndarray:
    index = {x: i for i, x in enumerate(unique)}
    return np.fromiter((index[x] for x in items), dtype=np.int64, count=len(items))


def default_threads(num_cpus: float) -> int:
    """torch threads for an actor that reserved num_cpus (Ray sets OMP_NUM_THREADS=1 for fractional actors)."""
    return max(1, min(os.cpu_count() or 1, round(num_cpus)))
