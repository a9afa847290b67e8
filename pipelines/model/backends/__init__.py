"""Model backends behind the Scorer: torch, ONNX Runtime, OpenVINO, each in float32 / bfloat16 / float16 / int8.

A backend takes padded int32 arrays (input_ids, attention_mask, token_type_ids or None) and returns float32
features, one row per sequence: a cross-encoder's logits [n, num_labels], or a bi-encoder's mean-pooled,
L2-normalised embedding [n, dim]. One concern per file, imports pointing down this list:

- `selection`: which backend and precision run on a device: CPU flags and families, the `auto` rules
  (`resolve_auto`), the plan-time check (`check_backend` raises a one-line ConfigError or returns warnings),
  and the device a model will use (`planned_device` before Ray starts, given whether the caller joins a
  cluster; `actor_device` once an actor's or replica's GPUs are known);
- `budget`: padded tokens per forward pass (`default_max_batch_tokens`; on a GPU from its free memory);
- `base`: the `Backend` interface;
- `torch_backends`: the torch backends (cross-encoder and bi-encoder features, causal-lm yes/no logits) and the
  head-only last layer of BERT-family cross-encoders;
- `export`: the export cache and what goes in it: ONNX export, ONNX Runtime fusions and dynamic int8, OpenVINO
  IR and NNCF static int8 calibrated on the bundled Cranfield pairs. Each runs once per (model fingerprint, kind,
  backend, dtype) into `model.cache_dir` (else $RERANK_CACHE_DIR, else ~/.cache/rerank) under a file lock;
- `runtimes`: the ONNX Runtime and OpenVINO backends (CPU);
- this module: `load_backend`, and the names callers use, re-exported.

Nothing here imports Ray or the apps: the model layer runs the same in a Ray actor, a Serve replica, a notebook.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipelines.model.backends.base import Backend
from pipelines.model.backends.budget import (
    CPU_BATCH_TOKENS,
    GPU_BATCH_TOKENS_FALLBACK,
    default_max_batch_tokens,
    estimate_parameters,
    gpu_batch_tokens,
)
from pipelines.model.backends.export import (
    CALIBRATION_PAIRS,
    EXPORTS,
    export_onnx,
    export_openvino,
    onnx_int8_settings,
    openvino_int8_settings,
    quantize_onnx_int8,
)
from pipelines.model.backends.runtimes import OnnxBackend, OpenVinoBackend
from pipelines.model.backends.selection import (
    AUTO_CPU_ORDER,
    AUTO_FLAGS,
    actor_device,
    check_backend,
    check_model_config,
    check_model_on,
    cpu_family,
    cpu_flags,
    cpu_name,
    cuda_bf16,
    log_choice,
    native_bf16,
    native_fp16,
    planned_device,
    resolve_auto,
    vnni,
)
from pipelines.model.backends.torch_backends import CausalLMBackend, TorchBackend
from pipelines.model.encoding import label_token_ids, model_fingerprint

if TYPE_CHECKING:
    import torch

    from pipelines.config import ModelConfig

__all__ = [
    "AUTO_CPU_ORDER",
    "AUTO_FLAGS",
    "CALIBRATION_PAIRS",
    "CPU_BATCH_TOKENS",
    "EXPORTS",
    "GPU_BATCH_TOKENS_FALLBACK",
    "Backend",
    "CausalLMBackend",
    "OnnxBackend",
    "OpenVinoBackend",
    "TorchBackend",
    "actor_device",
    "check_backend",
    "check_model_config",
    "check_model_on",
    "cpu_family",
    "cpu_flags",
    "cpu_name",
    "cuda_bf16",
    "default_max_batch_tokens",
    "estimate_parameters",
    "export_onnx",
    "export_openvino",
    "gpu_batch_tokens",
    "load_backend",
    "log_choice",
    "native_bf16",
    "native_fp16",
    "onnx_int8_settings",
    "openvino_int8_settings",
    "planned_device",
    "quantize_onnx_int8",
    "resolve_auto",
    "vnni",
]

log = logging.getLogger(__name__)


def load_backend(config: ModelConfig, device: torch.device, tokenizer, max_length: int) -> Backend:
    """The backend config.backend names, exporting or quantising first if the cache lacks it (auto: resolved
    first; the Scorer resolves it itself to record the choice)."""
    if "auto" in (config.backend, config.dtype):
        config, choice = resolve_auto(config, device)
        log_choice(choice)
    for w in check_backend(config, device):
        log.warning(w)
    if config.kind == "causal-lm":
        return CausalLMBackend(config, device, label_token_ids(tokenizer, config))
    if config.backend == "torch":
        return TorchBackend(config, device, tokenizer)
    fingerprint = model_fingerprint(config.name_or_path, config.revision)
    if config.backend == "onnx":
        return OnnxBackend(config, fingerprint, tokenizer)
    return OpenVinoBackend(config, fingerprint, tokenizer, max_length)
