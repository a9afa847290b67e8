"""Token budgets: padded tokens per forward pass when model.max_batch_tokens is auto (CPU: a fixed size that
stays in cache; GPU: from the GPU's free memory and the model's shape)."""

from __future__ import annotations

import torch

#: model.max_batch_tokens auto on CPU: 2048 padded tokens scored 20% faster than 4096 and 8192 with MiniLM on a
#: 2-core EPYC (activations stay in cache).
CPU_BATCH_TOKENS = 2048
#: On a GPU whose free memory this process cannot read (a driver planning for GPU workers): TEI's default.
GPU_BATCH_TOKENS_FALLBACK = 16384
#: gpu_batch_tokens: activation bytes per token per layer, in units of hidden x dtype bytes.
ACTIVATION_K = 16
#: gpu_batch_tokens: the share of (free - weights) the activations may take.
GPU_MEMORY_FRACTION = 0.5
#: gpu_batch_tokens: the range the budget is clamped to, and the multiple it is rounded down to.
GPU_BATCH_TOKENS_RANGE = (4096, 131072)
GPU_BATCH_TOKENS_MULTIPLE = 1024
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


def gpu_batch_tokens(
    free_bytes: float,
    weight_bytes: float,
    layers: int,
    hidden: int,
    dtype_bytes: int,
    *,
    k: int = ACTIVATION_K,
    fraction: float = GPU_MEMORY_FRACTION,
    lo: int = GPU_BATCH_TOKENS_RANGE[0],
    hi: int = GPU_BATCH_TOKENS_RANGE[1],
    multiple: int = GPU_BATCH_TOKENS_MULTIPLE,
) -> int:
    """model.max_batch_tokens auto on a GPU: padded tokens per forward pass from the GPU's free memory.

        bytes_per_token = layers x hidden x k x dtype_bytes
        budget          = fraction x (free_bytes - weight_bytes) / bytes_per_token
        result          = budget clamped to [lo, hi], rounded down to a multiple of `multiple`

    k = 16 counts what one layer holds per token in inference (the hidden state and residual, q/k/v, the
    attention output, the 4 x hidden feed-forward activation before and after its nonlinearity: about 15 x
    hidden). Inference keeps only a layer or two alive at once, so multiplying by all layers over-estimates by
    about layers / 2: that margin covers the caching allocator's fragmentation, attention scores where SDPA falls
    back to its math kernel (heads x length per token), and a second model copy or another process sharing the
    GPU. With fraction 0.5 a budget is at most a quarter of what would actually fit. Clamped because a few
    thousand tokens already fill a GPU's tensor cores for BERT-size models and larger batches only add latency
    (jobs/gpu_check.py measures the curve).

    E.g. BERT-base (12 x 768) in bfloat16: 295 KB per token; on a free 80 GB GPU 0.5 x 79.8 GB / 295 KB = 135k
    -> 131072 (hi); on a 16 GB one with 15 GB free, 25k -> 24576. A 0.6B LLM (28 x 1024, 1.2 GB) on 24 GB (22 GB
    free): 12k -> 11264."""
    per_token = max(1, int(layers) * int(hidden) * int(k) * int(dtype_bytes))
    room = max(0.0, float(free_bytes) - float(weight_bytes)) * fraction
    budget = min(hi, max(lo, int(room // per_token)))
    return max(multiple, budget // multiple * multiple)


def estimate_parameters(hf_config) -> int:
    """Parameters of a transformer from its config alone (no weights): embeddings (vocab and positions) plus, per
    layer, attention (4 h^2) and feed-forward (2 h x intermediate; 8 h^2 when unknown). Biases and norms ignored."""
    h = int(getattr(hf_config, "hidden_size", 0) or 0)
    layers = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
    inter = int(getattr(hf_config, "intermediate_size", 0) or 4 * h)
    vocab = int(getattr(hf_config, "vocab_size", 0) or 0)
    positions = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
    return (vocab + positions) * h + layers * (4 * h * h + 2 * h * inter)


def default_max_batch_tokens(device: torch.device | None, hf_config=None, dtype: str = "float32") -> int:
    """Padded tokens per forward pass when model.max_batch_tokens is auto: CPU_BATCH_TOKENS on CPU; on a GPU,
    gpu_batch_tokens from its free memory now (torch.cuda.mem_get_info) and the model's size and shape in
    `hf_config` at `dtype` (call it before the weights load); GPU_BATCH_TOKENS_FALLBACK where either is unknown."""
    if device is None or device.type != "cuda":
        return CPU_BATCH_TOKENS
    layers = getattr(hf_config, "num_hidden_layers", None)
    hidden = getattr(hf_config, "hidden_size", None)
    if not (layers and hidden and torch.cuda.is_available()):
        return GPU_BATCH_TOKENS_FALLBACK
    nbytes = _DTYPE_BYTES.get(dtype, 2 if dtype == "auto" else 4)
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):  # the index is not visible here
        return GPU_BATCH_TOKENS_FALLBACK
    return gpu_batch_tokens(free, estimate_parameters(hf_config) * nbytes, layers, hidden, nbytes)
