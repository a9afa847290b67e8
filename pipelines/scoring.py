"""The model: one Scorer for the batch job, the service and the evaluation, so their scores agree.

No Ray here. A Scorer loads a model once (through a backend of pipelines.backends: torch, ONNX Runtime or
OpenVINO) and turns (query, passage) pairs into float32 scores. The pairs of a call are tokenised in blocks on a
background thread, one block ahead of the model; each block is sorted by token length and cut into micro-batches
filled up to a token budget (padded tokens counted), handed to the model as int32 arrays, then put back in order.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import backends
from pipelines.config import ModelConfig
from pipelines.errors import ConfigError

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


def model_fingerprint(name_or_path: str, revision: str | None) -> str:
    """A pinned revision, or the hub commit of the cached snapshot, or a hash of a local folder's files."""
    if revision:
        return revision
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(p)).encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
        return "sha256:" + h.hexdigest()[:16]
    # A hub id: the commit the local cache resolved "main" to, which is what from_pretrained loads.
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        ref = Path(HF_HUB_CACHE) / ("models--" + name_or_path.replace("/", "--")) / "refs" / "main"
        if ref.is_file():
            return ref.read_text().strip()
    except ImportError:
        pass
    return "main (unresolved)"


def load_tokenizer_and_labels(config: ModelConfig):
    """Load the tokenizer and check the model config without loading weights: cheap enough for a driver to
    validate a job's model before any cluster time is spent. Returns (tokenizer, num_labels or None)."""
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name_or_path, **kwargs)
        hf_config = AutoConfig.from_pretrained(config.name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load model {config.name_or_path!r}: {str(err).strip().splitlines()[0]} "
            "(check model.name_or_path, access to the Hugging Face hub, or HF_HUB_OFFLINE and the local cache)"
        ) from None
    if config.kind == "bi-encoder":
        return tokenizer, None
    num_labels = getattr(hf_config, "num_labels", 1)
    if num_labels not in (1, 2):
        raise ConfigError(
            f"model {config.name_or_path!r} has num_labels={num_labels}; a cross-encoder needs 1 (a relevance "
            "logit) or 2 (not relevant / relevant). For an embedding model set model.kind: bi-encoder"
        )
    return tokenizer, num_labels


def plan_device(config: ModelConfig) -> torch.device:
    """The device the model will run on, as far as a driver can tell (it may itself have no GPU)."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def max_batch_tokens(config: ModelConfig, device: torch.device) -> int:
    if config.max_batch_tokens == "auto":
        return backends.default_max_batch_tokens(device)
    return int(config.max_batch_tokens)


def describe_model(config: ModelConfig) -> dict:
    """Name, kind and revision (or content hash) of a model, validated but not loaded: an unsupported
    backend/dtype/device combination is a ConfigError here, before any cluster time is spent."""
    device = plan_device(config)
    for warning in backends.check_backend(config, device):
        log.warning(warning)
    _, num_labels = load_tokenizer_and_labels(config)
    return {
        "name_or_path": config.name_or_path,
        "kind": config.kind,
        "revision": model_fingerprint(config.name_or_path, config.revision),
        "num_labels": num_labels,
        "backend": config.backend,
        "dtype": config.dtype,
        "max_length": config.max_length,
        "max_batch_tokens": max_batch_tokens(config, device),
    }


class Scorer:
    """Scores (query, passage) pairs with a cross-encoder or a bi-encoder.

    >>> scorer = Scorer(ModelConfig(name_or_path="cross-encoder/ms-marco-MiniLM-L6-v2"))
    >>> scorer.score(["what is ray"], ["Ray is a framework for scaling Python."])
    """

    def __init__(self, config: ModelConfig):
        self.config = config
        self.device = resolve_device(config.device)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        self.tokenizer, num_labels = load_tokenizer_and_labels(config)
        self.num_labels: int | None = num_labels if config.kind == "cross-encoder" else None
        limit = min(config.max_length, _max_positions(self.tokenizer, None))
        self.backend = backends.load_backend(config, self.device, self.tokenizer, limit)
        self.max_length = min(config.max_length, _max_positions(self.tokenizer, self.backend.hf_config))
        self.max_query_length = config.max_query_length or self.max_length // 2
        self.max_batch_tokens = max_batch_tokens(config, self.device)
        self._passage_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._tokenize_pool: ThreadPoolExecutor | None = None
        self._forward_lock = threading.Lock()
        self.stats = {"forward_passes": 0, "rows": 0, "tokens": 0, "padded_tokens": 0}

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
        )

    # ------------------------------------------------------------------ public API

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """Scores aligned lists of queries and passages, model.activation applied; float32 of the same length."""
        if self.config.kind == "bi-encoder":
            q, p = self._formatted(queries, passages)
            return self._score_bi(q, p) if q else np.zeros(0, dtype=np.float32)
        return self.from_logits(self.logits(queries, passages))

    def logits(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """A cross-encoder's logits, float32 [n, num_labels]; `from_logits` turns them into scores."""
        if self.config.kind != "cross-encoder":
            raise ConfigError("logits() needs model.kind: cross-encoder")
        q, p = self._formatted(queries, passages)
        if not q:
            return np.zeros((0, self.num_labels or 1), dtype=np.float32)
        return self._logits_cross(q, p)

    def from_logits(self, logits: np.ndarray, activation: str | None = None) -> np.ndarray:
        """Scores from logits: the logit (of the positive class for 2 labels), or with activation "sigmoid" a
        probability (softmax of the positive class for 2 labels). Defaults to model.activation."""
        activation = activation or self.config.activation
        logits = np.asarray(logits, dtype=np.float32)
        if self.num_labels == 1:
            score = logits[:, 0]
            return _sigmoid(score) if activation == "sigmoid" else score
        return _sigmoid(logits[:, 1] - logits[:, 0]) if activation == "sigmoid" else logits[:, 1]

    def _formatted(self, queries: Sequence[str], passages: Sequence[str]) -> tuple[list[str], list[str]]:
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        q = [self.config.query_template.format(query=x) for x in queries]
        p = [self.config.passage_template.format(text=x) for x in passages]
        return q, p

    def rank(self, query: str, passages: Sequence[str], top_n: int | None = None) -> list[tuple[int, float]]:
        """(index, score) pairs best first; ties keep input order."""
        scores = self.score([query] * len(passages), passages)
        order = np.argsort(-scores, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        return [(int(i), float(scores[i])) for i in order]

    # ------------------------------------------------------------------ cross-encoder

    def _cap_queries(self, queries: list[str]) -> list[str]:
        """Cut over-long queries so pair truncation can always cut the passage, never the query."""
        unique = list(dict.fromkeys(queries))
        ids = self.tokenizer(unique, add_special_tokens=False, truncation=False)["input_ids"]
        capped = {}
        for text, tok in zip(unique, ids):
            if len(tok) > self.max_query_length:
                capped[text] = self.tokenizer.decode(tok[: self.max_query_length])
        return [capped.get(x, x) for x in queries] if capped else queries

    def _encode_pairs(self, queries: list[str], passages: list[str]) -> dict[str, list[list[int]]]:
        """Token ids of each (query, passage) pair, unpadded: input_ids (and token_type_ids where the tokenizer
        makes them). The query is kept whole up to max_query_length; the passage is cut to fit max_length."""
        queries = self._cap_queries(queries)
        enc = self.tokenizer(queries, passages, truncation="only_second", max_length=self.max_length, padding=False)
        return {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}

    def _encode_texts(self, texts: list[str], max_length: int) -> dict[str, list[list[int]]]:
        enc = self.tokenizer(texts, truncation=True, max_length=max_length, padding=False)
        return {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}

    def _logits_cross(self, queries: list[str], passages: list[str]) -> np.ndarray:
        out = np.empty((len(queries), self.num_labels or 1), dtype=np.float32)
        return self._run(len(queries), lambda s, e: self._encode_pairs(queries[s:e], passages[s:e]), out)

    # ------------------------------------------------------------------ bi-encoder

    def embed(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings (bi-encoder models), float32 [n, dim]."""
        if self.config.kind != "bi-encoder":
            raise ConfigError("embed() needs model.kind: bi-encoder")
        texts = list(texts)
        limit = max_length or self.max_length
        out = np.empty((len(texts), self.backend.hf_config.hidden_size), dtype=np.float32)
        return self._run(len(texts), lambda s, e: self._encode_texts(texts[s:e], limit), out)

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

    # ------------------------------------------------------------------ batching and the model

    def _run(self, n: int, encode: Callable[[int, int], dict[str, list[list[int]]]], out: np.ndarray) -> np.ndarray:
        """Fill out[i] with the model's features of item i. Items are tokenised block by block on a background
        thread (HF fast tokenizers release the GIL), one block ahead of the model, so tokenisation and padding
        overlap the forward passes; the model only ever sees int32 arrays."""
        if n == 0:
            return out
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
                pending.append(self._tokenize_pool.submit(self._prepare_block, encode, start, end))

        submit()
        submit()
        while pending:
            batches = pending.popleft().result()
            submit()
            for rows, ids, mask, types in batches:
                with self._forward_lock:
                    out[rows] = self.backend.forward(ids, mask, types)
        return out

    def _prepare_block(self, encode, start: int, end: int) -> list[tuple]:
        """Tokenise items [start, end) and cut them into padded int32 micro-batches: (rows, ids, mask, types)."""
        enc = encode(start, end)
        input_ids = enc["input_ids"]
        types = enc.get("token_type_ids") if self.backend.uses_token_type_ids else None
        pad_id = self.tokenizer.pad_token_id or 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        batches = []
        for idx in self._micro_batches([len(x) for x in input_ids]):
            width = max(len(input_ids[i]) for i in idx)
            ids = np.full((len(idx), width), pad_id, dtype=np.int32)
            mask = np.zeros((len(idx), width), dtype=np.int32)
            tt = np.zeros((len(idx), width), dtype=np.int32) if types is not None else None
            for r, i in enumerate(idx):
                seq = input_ids[i]
                cols = slice(width - len(seq), width) if left else slice(0, len(seq))
                ids[r, cols] = seq
                mask[r, cols] = 1
                if tt is not None:
                    tt[r, cols] = types[i]
            st = self.stats
            st["forward_passes"] += 1
            st["rows"] += len(idx)
            st["tokens"] += int(mask.sum())
            st["padded_tokens"] += ids.size
            batches.append((idx + start, ids, mask, tt))
        return batches

    def _micro_batches(self, lengths: list[int]) -> list[np.ndarray]:
        """Indices grouped into micro-batches of similar length, longest first (so OOM shows up at once): each
        is filled while (rows x its longest length) stays within max_batch_tokens and rows within batch_size.
        A sequence longer than the budget runs alone."""
        order = np.argsort(-np.asarray(lengths), kind="stable")
        budget, cap = self.max_batch_tokens, self.config.batch_size
        batches, start = [], 0
        while start < len(order):
            longest = max(1, lengths[order[start]])
            rows = max(1, min(cap, budget // longest))
            batches.append(order[start : start + rows])
            start += rows
        return batches


def _max_positions(tokenizer, hf_config) -> int:
    limits = [getattr(hf_config, "max_position_embeddings", None), tokenizer.model_max_length]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 512


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function, float32."""
    return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))).astype(np.float32)


def _positions(items: list[str], unique: list[str]) -> np.ndarray:
    index = {x: i for i, x in enumerate(unique)}
    return np.fromiter((index[x] for x in items), dtype=np.int64, count=len(items))


def default_threads(num_cpus: float) -> int:
    """torch threads for an actor that reserved num_cpus (Ray sets OMP_NUM_THREADS=1 for fractional actors)."""
    return max(1, min(os.cpu_count() or 1, round(num_cpus)))
