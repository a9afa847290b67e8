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
- this module: `load_backend`, `backend_used`, and the names callers use, re-exported.

The fallback rule: onnx or openvino, asked for or chosen by auto, never crashes and never scores differently from
torch beyond float32 rounding. A model with its own code (model.trust_remote_code and an auto_map in its
config.json) is not exported: resolve_auto turns it to torch. Any other model is exported and verified against torch
on a padded probe batch (export.EXPORT_TOLERANCE, the result in the cache folder's VERIFY.json); an export that
fails or differs, or a runtime that cannot load it, makes load_backend score with torch instead. Either way one log
line says why, and the model's description (Scorer.info, backend_choice) names torch.

Nothing here imports Ray or the apps: the model layer runs the same in a Ray actor, a Serve replica, a notebook.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pipelines.errors import ConfigError
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
    EXPORT_TOLERANCE,
    EXPORTS,
    ExportRefused,
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
    EXPORTED_BACKENDS,
    actor_device,
    check_backend,
    check_model_config,
    check_model_on,
    cpu_family,
    cpu_flags,
    cpu_name,
    cuda_bf16,
    fallback_choice,
    log_choice,
    native_bf16,
    native_fp16,
    planned_device,
    remote_code_reason,
    resolve_auto,
    torch_dtype_for,
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
    "EXPORTED_BACKENDS",
    "EXPORTS",
    "EXPORT_TOLERANCE",
    "GPU_BATCH_TOKENS_FALLBACK",
    "Backend",
    "CausalLMBackend",
    "ExportRefused",
    "OnnxBackend",
    "OpenVinoBackend",
    "TorchBackend",
    "actor_device",
    "backend_used",
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
    "fallback_choice",
    "gpu_batch_tokens",
    "load_backend",
    "log_choice",
    "native_bf16",
    "native_fp16",
    "onnx_int8_settings",
    "openvino_int8_settings",
    "planned_device",
    "quantize_onnx_int8",
    "remote_code_reason",
    "resolve_auto",
    "torch_dtype_for",
    "vnni",
]

log = logging.getLogger(__name__)


def load_backend(config: ModelConfig, device: torch.device, tokenizer, max_length: int) -> Backend:
    """The backend config.backend names, exporting or quantising first if the cache lacks it (auto: resolved
    first; the Scorer resolves it itself to record the choice).

    onnx/openvino on a model that is not exported (remote code: resolve_auto), whose export fails or does not score
    like torch (export.ExportRefused), or that its runtime cannot load: the torch backend, with one WARNING line
    saying why, and `fallback` set on it (backend_used turns it into what the model's description reports)."""
    if "auto" in (config.backend, config.dtype) or config.backend in EXPORTED_BACKENDS:
        config, choice = resolve_auto(config, device)
        log_choice(choice)
    else:
        choice = None
    for w in check_backend(config, device):
        log.warning(w)
    if config.kind == "causal-lm":
        return CausalLMBackend(config, device, label_token_ids(tokenizer, config))
    if config.backend == "torch":
        backend = TorchBackend(config, device, tokenizer)
        if choice and choice.get("fallback"):
            backend.fallback = choice
        return backend
    fingerprint = model_fingerprint(config.name_or_path, config.revision)
    try:
        if config.backend == "onnx":
            return OnnxBackend(config, fingerprint, tokenizer)
        return OpenVinoBackend(config, fingerprint, tokenizer, max_length)
    except (ConfigError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - an export refused, or a runtime that cannot load it: torch scores it
        why = str(err).strip().splitlines()[0] if isinstance(err, ExportRefused) else _runtime_error(config, err)
    dtype = torch_dtype_for(config.dtype)
    record = fallback_choice(f"{config.backend}/{config.dtype}", config.backend, config.dtype, dtype, why, device)
    log.warning(
        "model.backend %s %s is not used for %s: %s; scoring with torch %s instead",
        config.backend,
        config.dtype,
        config.name_or_path,
        why,
        dtype,
    )
    backend = TorchBackend(config.model_copy(update={"backend": "torch", "dtype": dtype}), device, tokenizer)
    backend.fallback = record
    return backend


def _runtime_error(config: ModelConfig, err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{config.backend} cannot load the export ({type(err).__name__}{': ' + first if first else ''})"


def backend_used(
    config: ModelConfig, choice: dict[str, Any] | None, backend: Backend
) -> tuple[ModelConfig, dict[str, Any] | None]:
    """`config` and the record of the choice (resolve_auto's) as `backend` actually runs them: after a fallback
    in load_backend, torch and its dtype, the record's reason and `fallback` saying why (what was asked stays)."""
    record = getattr(backend, "fallback", None)
    if not record or config.backend == "torch":
        return config, choice
    merged = dict(choice or {}) | {k: v for k, v in record.items() if k != "requested" or not choice}
    return config.model_copy(update={"backend": "torch", "dtype": record["dtype"]}), merged
