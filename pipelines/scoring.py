"""The model: one Scorer for the batch job, the service and the evaluation, so their scores agree.

No Ray here. A Scorer loads a Hugging Face model once and turns (query, passage) pairs into float32 scores.
Pairs are sorted by token length into micro-batches so that padding stays small, then put back in order.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.config import ModelConfig
from pipelines.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def describe_model(config: ModelConfig) -> dict:
    """Name, kind and revision (or content hash) of a model, validated but not loaded."""
    _, num_labels = load_tokenizer_and_labels(config)
    return {
        "name_or_path": config.name_or_path,
        "kind": config.kind,
        "revision": model_fingerprint(config.name_or_path, config.revision),
        "num_labels": num_labels,
        "dtype": config.dtype,
        "max_length": config.max_length,
    }


class Scorer:
    """Scores (query, passage) pairs with a cross-encoder or a bi-encoder.

    >>> scorer = Scorer(ModelConfig(name_or_path="cross-encoder/ms-marco-MiniLM-L6-v2"))
    >>> scorer.score(["what is ray"], ["Ray is a framework for scaling Python."])
    """

    def __init__(self, config: ModelConfig):
        from transformers import AutoModel, AutoModelForSequenceClassification

        self.config = config
        self.device = resolve_device(config.device)
        dtype = _DTYPES[config.dtype]
        if self.device.type == "cpu" and dtype != torch.float32:
            log.warning("model.dtype=%s on CPU is slow or unsupported; consider float32", config.dtype)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
        self.tokenizer, num_labels = load_tokenizer_and_labels(config)
        if config.kind == "cross-encoder":
            self.model = AutoModelForSequenceClassification.from_pretrained(config.name_or_path, dtype=dtype, **kwargs)
            self.num_labels: int | None = num_labels
        else:
            self.model = AutoModel.from_pretrained(config.name_or_path, dtype=dtype, **kwargs)
            self.num_labels = None
        self.model.to(self.device).eval()
        self.max_length = min(config.max_length, self._model_max_positions())
        self.max_query_length = config.max_query_length or self.max_length // 2
        self._passage_cache: OrderedDict[str, np.ndarray] = OrderedDict()

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
        )

    def _model_max_positions(self) -> int:
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
        return min(usable) if usable else 512

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

    def _logits_cross(self, queries: list[str], passages: list[str]) -> np.ndarray:
        queries = self._cap_queries(queries)
        enc = self.tokenizer(queries, passages, truncation="only_second", max_length=self.max_length, padding=False)
        input_ids = enc["input_ids"]
        extra = {k: enc[k] for k in ("token_type_ids",) if k in enc}
        out = np.empty((len(queries), self.num_labels or 1), dtype=np.float32)
        for idx in self._micro_batches([len(x) for x in input_ids]):
            features = {"input_ids": [input_ids[i] for i in idx]}
            for k, v in extra.items():
                features[k] = [v[i] for i in idx]
            batch = self.tokenizer.pad(features, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                out[idx] = self.model(**batch).logits.float().cpu().numpy()
        return out

    # ------------------------------------------------------------------ bi-encoder

    def embed(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings (bi-encoder models), float32 [n, dim]."""
        if self.config.kind != "bi-encoder":
            raise ConfigError("embed() needs model.kind: bi-encoder")
        texts = list(texts)
        enc = self.tokenizer(texts, truncation=True, max_length=max_length or self.max_length, padding=False)
        input_ids = enc["input_ids"]
        extra = {k: enc[k] for k in ("token_type_ids",) if k in enc}
        dim = self.model.config.hidden_size
        out = np.empty((len(texts), dim), dtype=np.float32)
        for idx in self._micro_batches([len(x) for x in input_ids]):
            features = {"input_ids": [input_ids[i] for i in idx]}
            for k, v in extra.items():
                features[k] = [v[i] for i in idx]
            batch = self.tokenizer.pad(features, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()
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

    # ------------------------------------------------------------------ batching

    def _micro_batches(self, lengths: list[int]) -> list[np.ndarray]:
        """Indices grouped into micro-batches of similar length (longest first, so OOM shows up at once)."""
        order = np.argsort(-np.asarray(lengths), kind="stable")
        bs = self.config.batch_size
        return [order[i : i + bs] for i in range(0, len(order), bs)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function, float32."""
    return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))).astype(np.float32)


def _positions(items: list[str], unique: list[str]) -> np.ndarray:
    index = {x: i for i, x in enumerate(unique)}
    return np.fromiter((index[x] for x in items), dtype=np.int64, count=len(items))


def default_threads(num_cpus: float) -> int:
    """torch threads for an actor that reserved num_cpus (Ray sets OMP_NUM_THREADS=1 for fractional actors)."""
    return max(1, min(os.cpu_count() or 1, round(num_cpus)))
