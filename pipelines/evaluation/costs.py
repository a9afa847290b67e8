"""What a ranking costs an LLM: context tokens of the chunks it is sent, and money at a price per million.

Tokens are counted with a real tokenizer on the chunk text exactly as it is sent (no special tokens, no
truncation), once per document; the cost of sending the top N of a ranking is the sum over its first N docs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pipelines.errors import ConfigError
from pipelines.evaluation.metrics import Ranking

log = logging.getLogger(__name__)


def count_tokens(texts: dict[str, str], tokenizer_name: str, batch: int = 1024) -> dict[str, int]:
    """doc id -> token count with a Hugging Face tokenizer (hub id or local folder)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_name)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load tokenizer {tokenizer_name!r} (cost.tokenizer): {str(err).splitlines()[0]}"
        ) from None
    tok.model_max_length = 1 << 30  # counting only: no "sequence too long" warnings, no truncation
    ids = list(texts)
    counts: dict[str, int] = {}
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        enc = tok([texts[d] for d in chunk], add_special_tokens=False, truncation=False)["input_ids"]
        counts.update({d: len(e) for d, e in zip(chunk, enc)})
    return counts


def context_tokens(ranking: Ranking, doc_tokens: dict[str, int], query_ids: Sequence[str], depth: int) -> np.ndarray:
    """tokens[q, n-1] = tokens of the first n chunks sent for query q (fewer when the ranking is shorter)."""
    out = np.zeros((len(query_ids), depth), dtype=np.int64)
    for i, q in enumerate(query_ids):
        lengths = [doc_tokens[d] for d in ranking.get(q, [])[:depth]]
        if lengths:
            cum = np.cumsum(lengths)
            out[i, : len(cum)] = cum
            out[i, len(cum) :] = cum[-1]
    return out


def token_summary(tokens: np.ndarray, n: int, price_per_million: float) -> dict[str, float]:
    """Total and per-query LLM context tokens when the top n are sent, and their cost."""
    col = tokens[:, n - 1] if tokens.shape[0] else np.zeros(0, dtype=np.int64)
    total = int(col.sum())
    mean = float(col.mean()) if len(col) else 0.0
    return {
        "total_tokens": total,
        "mean_tokens_per_query": mean,
        "cost_total": total * price_per_million / 1e6,
        "cost_per_1000_queries": mean * 1000 * price_per_million / 1e6,
    }
