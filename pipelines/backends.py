"""Model backends behind the Scorer: torch, ONNX Runtime, OpenVINO, each in float32 / bfloat16 / float16 / int8.

One home for loading, exporting and running a model's forward pass. A backend takes padded int32 arrays
(input_ids, attention_mask, token_type_ids or None) and returns float32 features, one row per sequence:
a cross-encoder's logits [n, num_labels], or a bi-encoder's mean-pooled, L2-normalised embedding [n, dim].

- `check_backend(config, device)` is the plan-time check: every (backend, dtype, device) either passes or raises
  a one-line ConfigError saying why and what to use instead; soft problems come back as warnings.
  `check_model_on` runs it on the device the model will use: `planned_device` before Ray starts (None when a
  cluster's workers decide: then only what no device runs is refused), then `actor_device` once the actors' or
  replicas' GPUs are known.
- Exports (ONNX, OpenVINO IR) and quantisation run once per (model fingerprint, kind, backend, dtype) into a
  cache folder (`model.cache_dir`, else $RERANK_CACHE_DIR, else ~/.cache/rerank), under a file lock so that
  concurrent actors wait for one export instead of racing.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.encoding import label_token_ids, model_fingerprint, uses_token_type_ids
from pipelines.errors import ConfigError

if TYPE_CHECKING:  # annotations only: jobs/gpu_check.py runs the torch backend without pydantic
    from pipelines.config import ModelConfig

log = logging.getLogger(__name__)

ONNX_OPSET = 17
#: Bumped when what an export contains changes (2: the head-only last layer), so older cached files are not reused.
EXPORT_FORMAT = "2"
#: Exports and quantisations done by this process, by artifact kind: tests assert a second load reuses the cache.
EXPORTS: Counter[str] = Counter()
#: Pairs of (query, passage) used to calibrate OpenVINO's static int8 quantisation (from the bundled Cranfield).
CALIBRATION_PAIRS = 200


# ---------------------------------------------------------------------------------------------- CPU and support


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def native_fp16() -> bool:
    return bool(cpu_flags() & {"avx512_fp16", "amx_fp16"})


def vnni() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), else platform.processor(), else the machine type."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


#: The flags resolve_auto reads, in the order they are reported.
AUTO_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")


def cpu_family() -> str:
    """What resolve_auto decides on: amx (AMX int8/bf16 tiles), vnni+bf16 (AVX512-VNNI and AVX512-BF16, e.g. Zen 4/5,
    Cooper Lake), vnni (AVX512-VNNI or AVX-VNNI without native bf16: Cascade Lake, Ice Lake, Alder Lake and later
    client cores), avx2 (neither: Zen 1-3, Haswell-Skylake), or other (no x86 flags: Arm, macOS)."""
    flags = cpu_flags()
    if flags & {"amx_int8", "amx_bf16"}:
        return "amx"
    if vnni() and native_bf16():
        return "vnni+bf16"
    if vnni():
        return "vnni"
    if "avx2" in flags:
        return "avx2"
    return "other"


def _installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _have(backend: str) -> bool:
    return {
        "torch": True,
        "onnx": _installed("onnxruntime", "onnx"),
        "openvino": _installed("openvino", "onnx"),
    }[backend]


#: CPU preferences of `auto`, fastest first, per cpu_family: only combinations measured within 1% nDCG@10 of
#: float32 torch at K = 10, 20 and 100 on Cranfield (README, "Backends and precision"), each taken only when its
#: packages are installed; no usable one leaves torch (bfloat16 autocast with native bfloat16, else float32).
#: Later entries serve a fixed backend or dtype (`backend: onnx, dtype: auto`; `backend: auto, dtype: int8`).
#: - vnni+bf16, measured on a 2-core AMD EPYC with AVX512-VNNI/BF16 (in-process, x the plain float32 loop):
#:   openvino bfloat16 6.8x; openvino int8 (first layer outside int8, in bfloat16 here) about 1.3x that, but its
#:   activation ranges are calibrated on Cranfield, which a bfloat16 model does not depend on (a held-out domain
#:   risks more than the -0.7% it showed at K=20); torch bfloat16 4.8x. onnx int8 is in no order: its activation
#:   scales are per call, and the same model lost 0.1% or 1.3% at K=100 with batches of 32 or of 2048 tokens.
#: - amx: the vnni+bf16 order (AMX adds bf16 and int8 tiles; not measured by this project).
#: - vnni without native bf16 (Cascade Lake, Ice Lake, Alder Lake and later client cores): openvino int8 with the
#:   first layer in float32 (its quality measured on the VNNI EPYC: +1.1% / +0.6% / +0.1%; static scales).
#: - avx2, measured on a 2-core AVX2 EPYC: onnx float32 1.07-1.25x torch float32; openvino int8 0.8x and bfloat16
#:   emulated (7x slower); onnx int8 U8S8 lost 1.5% (saturation; U8U8 keeps 1% but its speed there is unmeasured).
AUTO_CPU_ORDER: dict[str, tuple[tuple[str, str], ...]] = {
    "amx": (("openvino", "bfloat16"), ("torch", "bfloat16"), ("openvino", "int8")),
    "vnni+bf16": (("openvino", "bfloat16"), ("torch", "bfloat16"), ("openvino", "int8")),
    "vnni": (("openvino", "int8"), ("onnx", "float32")),
    "avx2": (("onnx", "float32"),),
    "other": (),
}

#: A fixed dtype with backend auto where the order has none: the backends to try, fastest first where measured.
_DTYPE_FALLBACK = {
    "float32": ("onnx", "openvino", "torch"),
    "bfloat16": ("openvino", "torch"),
    "float16": ("torch", "openvino"),
    "int8": ("onnx", "openvino"),  # on AVX2: onnx int8 1.4x torch float32, openvino int8 0.8x (one run each)
}

_AUTO_WHY = {
    "amx": "AMX and native bfloat16: OpenVINO bfloat16, within 1% nDCG@10 of float32 and independent of calibration data",
    "vnni+bf16": "native bfloat16 (avx512_bf16): OpenVINO bfloat16 measured 6.8x the plain float32 loop within 0.2% "
    "nDCG@10 of float32; int8 was faster but depends on calibration data",
    "vnni": "int8 dot products (VNNI) without native bfloat16: OpenVINO static int8 (first layer in float32), "
    "within 1% nDCG@10 of float32",
    "avx2": "AVX2 without VNNI or native bfloat16: int8 and bfloat16 are slow or lose quality here; ONNX Runtime "
    "float32 (fused) is lossless and faster than torch",
    "other": "no x86 feature flags (e.g. Arm, macOS): torch, the measured default",
}


def _runnable(config: ModelConfig, backend: str, dtype: str, device: torch.device) -> bool:
    if not _have(backend) or (backend == "openvino" and dtype == "int8" and not _installed("nncf")):
        return False
    try:
        check_backend(config.model_copy(update={"backend": backend, "dtype": dtype}), device)
    except ConfigError:
        return False
    return True


def _best_dtype(config: ModelConfig, backend: str, device: torch.device) -> tuple[str, str]:
    """model.dtype auto with a fixed backend: the fastest quality-keeping dtype of that backend here."""
    if device.type == "cuda":
        if cuda_bf16():
            return "bfloat16", (
                "GPU with bfloat16: bfloat16 weights (tensor cores at the float16 rate, float32's range: no overflow "
                "in long sums or LLM activations)"
            )
        return "float16", "GPU without bfloat16 (or not visible here): float16 weights (tensor cores)"
    order = [d for b, d in AUTO_CPU_ORDER[cpu_family()] if b == backend]
    if backend == "torch" and config.kind == "causal-lm" and native_bf16():
        order = ["bfloat16"]
    for dtype in [*order, "float32"]:
        if _runnable(config, backend, dtype, device):
            return dtype, f"the fastest {backend} precision kept within 1% nDCG@10 on this CPU family"
    return "float32", "float32"


def cuda_bf16() -> bool:
    """This process sees a CUDA GPU and it computes bfloat16 natively (Ampere and later)."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_auto(config: ModelConfig, device: torch.device) -> tuple[ModelConfig, dict[str, Any] | None]:
    """`config` with model.backend / model.dtype auto replaced by what runs on `device`, and a record of the
    choice (None when neither was auto): requested, backend, dtype, reason, device, cpu, cpu_family, cpu_flags.

    Rules (no timing: the same machine always gets the same answer, so a job's driver and its actors agree):
    - CUDA: torch, bfloat16 where the GPU has it (torch.cuda.is_bf16_supported), else float16; float32 only when
      model.dtype asks for it (a driver that sees no GPU answers float16, which every GPU runs);
    - CPU, causal-lm: torch, bfloat16 autocast with native bfloat16, else float32;
    - CPU, cross-encoder / bi-encoder: the first of AUTO_CPU_ORDER[cpu_family()] whose packages are installed,
      else torch (bfloat16 autocast with native bfloat16, else float32);
    - a fixed backend with dtype auto: that backend's best dtype by the same order; a fixed dtype with backend
      auto: the first backend of the order with that dtype, else the first that runs it."""
    backend, dtype = config.backend, config.dtype
    if device.type == "cuda" and (backend, dtype) == ("torch", "float32") and "dtype" not in config.model_fields_set:
        # model.dtype left at its default (float32, for CPUs): a GPU gets its fast precision; float32 when asked.
        gpu = "bfloat16" if cuda_bf16() else "float16"
        choice = {
            "requested": "torch/float32 (the default, not set)",
            "backend": "torch",
            "dtype": gpu,
            "reason": "GPU default: bfloat16 where the GPU has it, else float16; set model.dtype float32 to keep it",
            "device": str(device),
        }
        return config.model_copy(update={"dtype": gpu}), choice
    if backend != "auto" and dtype != "auto":
        return config, None
    family = cpu_family() if device.type == "cpu" else "gpu"
    reason = ""
    if backend == "auto" and dtype == "auto":
        if device.type == "cuda" or config.kind == "causal-lm":
            backend = "torch"
            dtype, reason = _best_dtype(config, "torch", device)
        else:
            for b, d in AUTO_CPU_ORDER[family]:
                if _runnable(config, b, d, device):
                    backend, dtype, reason = b, d, _AUTO_WHY[family]
                    break
            else:
                backend = "torch"
                dtype = "bfloat16" if native_bf16() else "float32"
                reason = (
                    _AUTO_WHY[family]
                    if family == "other"
                    else (f"{_AUTO_WHY[family]}; its packages are not installed ({_EXTRA}), so torch")
                )
    elif backend == "auto":  # a fixed dtype
        candidates = ["torch"] if device.type == "cuda" or config.kind == "causal-lm" else []
        if not candidates:
            order = [b for b, d in AUTO_CPU_ORDER[family] if d == dtype]
            candidates = [*order, *(b for b in _DTYPE_FALLBACK.get(dtype, ()) if b not in order)]
        backend = next((b for b in candidates if _runnable(config, b, dtype, device)), "torch")
        reason = f"the fastest backend measured for {dtype} on this {'GPU' if family == 'gpu' else 'CPU family'}"
    else:  # a fixed backend
        dtype, reason = _best_dtype(config, backend, device)
    flags = sorted(cpu_flags() & set(AUTO_FLAGS), key=AUTO_FLAGS.index)
    choice = {
        "requested": f"{config.backend}/{config.dtype}",
        "backend": backend,
        "dtype": dtype,
        "reason": reason,
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_family": family if device.type == "cpu" else cpu_family(),
        "cpu_flags": flags,
    }
    return config.model_copy(update={"backend": backend, "dtype": dtype}), choice


_LOGGED: set[tuple] = set()


def log_choice(choice: dict[str, Any] | None) -> None:
    """Log what auto chose, once per process and choice."""
    if not choice:
        return
    key = (choice["requested"], choice["backend"], choice["dtype"], choice["device"])
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    log.info(
        "model.backend/dtype %s -> %s %s on %s (%s; CPU %s, flags %s)",
        choice["requested"],
        choice["backend"],
        choice["dtype"],
        choice["device"],
        choice["reason"],
        choice["cpu"],
        " ".join(choice["cpu_flags"]) or "none",
    )


_EXTRA = "pip install 'rerank[cpu-backends]'"


def _require(module: str, backend: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"model.backend {backend} needs the {module} package; {_EXTRA}")


def check_backend(config: ModelConfig, device: torch.device) -> list[str]:
    """Raise ConfigError (one line) for a combination that cannot run; return warnings for slow ones. With
    backend or dtype auto, what resolve_auto picks on `device` is checked."""
    if "auto" in (config.backend, config.dtype):
        config = resolve_auto(config, device)[0]
    backend, dtype, where = config.backend, config.dtype, device.type
    combo = f"model.backend {backend} with model.dtype {dtype}"
    out: list[str] = []
    if backend == "torch":
        if dtype == "int8":
            raise ConfigError(
                f"{combo} is not supported: torch's int8 path (torch.ao quantize_dynamic) is deprecated and due "
                "for removal; use model.backend onnx or openvino with model.dtype int8"
            )
        if where == "cpu" and dtype == "float16":
            raise ConfigError(
                f"{combo} on CPU is not supported: torch has no fast float16 CPU kernels; use bfloat16 "
                "(autocast) or float32, or float16 on a GPU"
            )
        if where == "cuda" and dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{combo}: this GPU has no bfloat16 support; use float16")
        if where == "cpu" and dtype == "bfloat16" and not native_bf16():
            out.append(_slow_bf16(combo))
        return out
    if where != "cpu":
        raise ConfigError(
            f"{combo} on {device}: the {backend} backend runs on CPU only here; on a GPU use model.backend torch "
            "with float16 or bfloat16"
        )
    if backend == "onnx":
        _require("onnxruntime", backend)
        _require("onnx", backend)
        if dtype in ("bfloat16", "float16"):
            raise ConfigError(
                f"{combo} is not supported: ONNX Runtime's CPU kernels have no fast {dtype} matmul; use "
                "model.backend openvino (bfloat16) or torch (bfloat16 autocast), or int8"
            )
        return out
    if backend == "openvino":
        _require("openvino", backend)
        _require("onnx", backend)
        if dtype == "float16" and not native_fp16():
            raise ConfigError(
                f"{combo} is not supported on this CPU (no avx512_fp16/amx_fp16 flag); use bfloat16 or float32"
            )
        if dtype == "int8":
            _require("nncf", backend)
        if dtype == "bfloat16" and not native_bf16():
            out.append(
                f"{combo}: this CPU has no native bfloat16 (no avx512_bf16/amx_bf16 flag in /proc/cpuinfo); OpenVINO "
                "ignores the hint and computes in float32 here"
            )
        return out
    raise ConfigError(f"unknown model.backend {backend!r}; use torch, onnx or openvino")


def planned_device(config: ModelConfig, on_cluster: bool | None = None) -> torch.device | None:
    """The device the model will run on, as far as this process can tell before Ray starts: model.device when
    set; with auto, this machine's (CUDA when present) for a local Ray. None when the workers of a cluster decide:
    auto, and the job runs on a cluster (`on_cluster`; by default, when RAY_ADDRESS is set), whose workers may
    have GPUs this machine lacks, or none."""
    from pipelines.ray_runtime import joins_cluster

    if config.device != "auto":
        return torch.device(config.device)
    if joins_cluster() if on_cluster is None else on_cluster:
        return None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def actor_device(config: ModelConfig, gpus: float) -> torch.device:
    """Where a Ray actor or replica reserving `gpus` GPUs runs the model: Ray hides every GPU from one that
    reserves none."""
    if config.device == "auto":
        return torch.device("cuda" if gpus > 0 else "cpu")
    if config.device.startswith("cuda") and gpus <= 0:
        raise ConfigError(
            f"model.device is {config.device} but the actors get no GPU (the cluster has none, or "
            "scale.num_gpus_per_actor / serve.num_gpus_per_replica is 0): use model.device auto or cpu, or give "
            "them GPUs"
        )
    device = torch.device(config.device)
    # Ray shows an actor only the GPUs it reserved, numbered from 0: cuda:N needs N + 1 of them.
    if device.type == "cuda" and device.index is not None and device.index >= max(1, math.ceil(gpus)):
        raise ConfigError(
            f"model.device is {config.device} but each actor or replica reserves {gpus:g} GPU(s), which it sees as "
            f"cuda:0{'' if math.ceil(gpus) <= 1 else f'..cuda:{math.ceil(gpus) - 1}'}: use model.device cuda (or "
            "auto), or reserve more GPUs per actor"
        )
    return device


def check_model_config(config: ModelConfig) -> None:
    """What entry points call before starting Ray: check_model_on the planned device."""
    check_model_on(config, planned_device(config))


def check_model_on(config: ModelConfig, device: torch.device | None) -> None:
    """check_backend on `device`: refusals raise, warnings are logged. None (the device is not known yet) refuses
    only what no device can run; the model's own process checks again on its device when it loads."""
    if device is None:
        refusals = []
        for candidate in ("cpu", "cuda"):
            try:
                check_backend(config, torch.device(candidate))
                return
            except ConfigError as err:
                refusals.append(err)
        raise refusals[0]
    for warning in check_backend(config, device):
        log.warning(warning)


def _slow_bf16(combo: str) -> str:
    return (
        f"{combo}: this CPU has no native bfloat16 (no avx512_bf16/amx_bf16 flag in /proc/cpuinfo), so bfloat16 is "
        "emulated and usually slower than float32; prefer float32 or int8 here"
    )


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


# ---------------------------------------------------------------------------------------------- the backends


class Backend:
    """forward(input_ids, attention_mask, token_type_ids) -> float32 features [n, d] (see the module doc).

    The Scorer runs a call's micro-batches through `forward_device`, whose results may stay where the backend
    computes them (a torch tensor on the GPU), and gathers them with one `to_host` per call: on a GPU one
    device-to-host copy and one synchronisation per call, not one per micro-batch."""

    name = "base"
    hf_config: Any
    uses_token_type_ids: bool
    #: The last layer runs for the first token only (see _HeadOnlyLastLayer).
    head_only: bool = False

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None
    ) -> np.ndarray:
        raise NotImplementedError

    def forward_device(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None):
        """One micro-batch; the result may stay on the device (default: forward, a host array)."""
        return self.forward(input_ids, attention_mask, token_type_ids)

    def to_host(self, parts: list) -> np.ndarray:
        """forward_device results, in order -> one float32 host array [sum of rows, d]."""
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])


class _TorchDevice:
    """Host arrays in and device tensors out, the torch way: on CUDA each input is copied into pinned (page-locked)
    host memory and sent with non_blocking=True, so the copy overlaps the previous micro-batch's kernels (torch's
    caching host allocator keeps a pinned block until its copy has finished); outputs stay on the device until
    to_host makes one copy of all of them."""

    device: torch.device

    def _input(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def to_host(self, parts: list) -> np.ndarray:
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        if isinstance(parts[0], torch.Tensor):
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            return out.float().cpu().numpy()
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.to_host([self.forward_device(input_ids, attention_mask, token_type_ids)])


#: Encoders whose sequence-classification head reads the first token only, and whose layers are BERT's
#: (attention.self.query/key/value, attention.output, intermediate, output). Their last layer can be computed for
#: that token alone.
HEAD_ONLY_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})


class _HeadOnlyLastLayer(torch.nn.Module):
    """A BERT-family encoder's last layer, computed for the first token only: all that a first-token
    classification head (BERT's pooler, RoBERTa/XLM-R/ELECTRA's classifier) reads. Keys and values still come from
    every token; the query projection, the attention output, the feed-forward block and both layer norms run
    for one position instead of all of them, which saves 10/12 of a layer's matmul FLOPs (about 14% of a
    6-layer model). The same arithmetic on the same inputs, so scores match the full layer to float rounding;
    `head_only_last_layer` checks that on a probe batch before using it."""

    def __init__(self, layer: torch.nn.Module, returns_tuple: bool):
        super().__init__()
        self.layer, self.returns_tuple = layer, returns_tuple
        self.mask: torch.Tensor | None = None  # [n, L] attention mask of the current call, set by _Features

    def forward(self, hidden_states, *args, **kwargs):
        layer = self.layer
        attn = layer.attention.self
        n, length, _ = hidden_states.shape
        heads, size = attn.num_attention_heads, attn.attention_head_size
        first = hidden_states[:, :1]
        q = attn.query(first).view(n, 1, heads, size).transpose(1, 2)
        k = attn.key(hidden_states).view(n, length, heads, size).transpose(1, 2)
        v = attn.value(hidden_states).view(n, length, heads, size).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (size**-0.5)
        if self.mask is not None:
            scores = scores.masked_fill(self.mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        context = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        context = context.transpose(1, 2).reshape(n, 1, heads * size)
        attended = layer.attention.output(context, first)
        out = layer.output(layer.intermediate(attended), attended)
        return (out,) if self.returns_tuple else out


def _encoder_layers(model: torch.nn.Module):
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def head_only_last_layer(features: _Features) -> bool:
    """Swap a cross-encoder's last encoder layer for `_HeadOnlyLastLayer` where the architecture allows it and a
    probe batch (two pairs, one padded) scores the same as the full model; return whether it was swapped.
    Anything else (other architectures, relative positions, a transformers version whose layers differ) keeps
    the full model."""
    model = features.model
    cfg = getattr(model, "config", None)
    layers = _encoder_layers(model)
    if (
        features.kind != "cross-encoder"
        or layers is None
        or getattr(cfg, "model_type", None) not in HEAD_ONLY_MODEL_TYPES
        or getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute")
        or getattr(cfg, "is_decoder", False)
        or not all(hasattr(layers[-1], a) for a in ("attention", "intermediate", "output"))
    ):
        return False
    last = layers[-1]
    device = next(model.parameters()).device
    vocab = int(getattr(cfg, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), min(vocab, 2000), (2, 12), generator=gen, dtype=torch.int32)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids, mask = ids.to(device), mask.to(device)
    tt = torch.zeros_like(ids) if getattr(cfg, "type_vocab_size", 0) > 0 else None
    kinds: list[bool] = []
    hook = last.register_forward_hook(lambda _m, _i, out: kinds.append(isinstance(out, tuple)))
    try:
        with torch.inference_mode():
            ref = features(ids, mask, tt).float()
        hook.remove()
        layers[-1] = features.head_layer = _HeadOnlyLastLayer(last, returns_tuple=bool(kinds and kinds[0]))
        with torch.inference_mode():
            got = features(ids, mask, tt).float()
        tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
        ok = got.shape == ref.shape and bool(((got - ref).abs() <= tol * (1 + ref.abs())).all())
    except Exception as err:  # noqa: BLE001 - any incompatibility means: keep the full layer
        log.info("head-only last layer not usable for %s: %s", type(model).__name__, err)
        ok = False
    finally:
        hook.remove()  # no-op when already removed; here for the paths that raised before it
    if not ok:
        layers[-1] = last
        features.head_layer = None
        log.info(
            "head-only last layer does not match the full layer for %s; using the full model", type(model).__name__
        )
    return ok


class _Features(torch.nn.Module):
    """The model plus the part that turns its output into features: the logits, or the pooled embedding."""

    def __init__(self, model: torch.nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind
        #: Set by head_only_last_layer when it swaps the last layer; it needs each call's attention mask.
        self.head_layer: _HeadOnlyLastLayer | None = None

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if self.head_layer is not None:
            self.head_layer.mask = attention_mask
        kwargs = {"input_ids": input_ids.long(), "attention_mask": attention_mask.long()}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids.long()
        out = self.model(**kwargs)
        if self.kind == "cross-encoder":
            return out.logits.float()
        hidden = out.last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def load_hf_model(config: ModelConfig, attn: str | None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The Hugging Face model of config.kind, attention implementation `attn` where the model supports it."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if config.kind == "cross-encoder" else AutoModel
    kwargs: dict[str, Any] = {
        "revision": config.revision,
        "trust_remote_code": config.trust_remote_code,
        "dtype": dtype,
    }
    if attn:
        try:
            return cls.from_pretrained(config.name_or_path, attn_implementation=attn, **kwargs).eval()
        except (ValueError, ImportError) as err:  # the architecture does not support it
            log.info(
                "attn_implementation=%s not available for %s (%s); using the default", attn, config.name_or_path, err
            )
    return cls.from_pretrained(config.name_or_path, **kwargs).eval()


class TorchBackend(_TorchDevice, Backend):
    """torch with SDPA attention. CPU: float32, or bfloat16 through autocast (weights stay float32: casting them
    scrambled close scores). GPU: float16/bfloat16 weights (float32 when asked)."""

    name = "torch"

    def __init__(self, config: ModelConfig, device: torch.device, tokenizer):
        self.device = device
        gpu_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.dtype)
        weights = gpu_dtype if (device.type == "cuda" and gpu_dtype is not None) else torch.float32
        self.model = _Features(load_hf_model(config, "sdpa", weights), config.kind).to(device).eval()
        #: The last layer runs for the first token only (cross-encoders of the BERT family; see _HeadOnlyLastLayer).
        self.head_only = head_only_last_layer(self.model)
        self.hf_config = self.model.model.config
        self.uses_token_type_ids = uses_token_type_ids(tokenizer, self.hf_config)
        self.autocast = device.type == "cpu" and config.dtype == "bfloat16"

    def forward_device(self, input_ids, attention_mask, token_type_ids):
        ids, mask = self._input(input_ids), self._input(attention_mask)
        tt = None
        if token_type_ids is not None and self.uses_token_type_ids:
            tt = self._input(token_type_ids)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(ids, mask, tt).float()


class CausalLMBackend(_TorchDevice, Backend):
    """An LLM reranker on torch: logit(yes) - logit(no) (or logit(yes) alone) at each row's last position, one
    column. Rows come
    left-padded, so the last position is the last real token and only its logits are computed (logits_to_keep);
    position ids count real tokens only, as in the unpadded prompt."""

    name = "torch"
    uses_token_type_ids = False

    def __init__(self, config: ModelConfig, device: torch.device, label_ids: list[int]):
        from transformers import AutoModelForCausalLM

        gpu_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.dtype)
        weights = gpu_dtype if (device.type == "cuda" and gpu_dtype is not None) else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(
            config.name_or_path, dtype=weights, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
        self.model.to(device).eval()
        self.device, self.label_ids, self.hf_config = device, label_ids, self.model.config
        self.autocast = device.type == "cpu" and config.dtype == "bfloat16"
        params = inspect.signature(self.model.forward).parameters
        self.keep_last = "logits_to_keep" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
        self.positions = "position_ids" in params

    def forward_device(self, input_ids, attention_mask, token_type_ids):
        ids = self._input(input_ids).long()
        mask = self._input(attention_mask).long()
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if self.positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            labels = self.model(**kwargs).logits[:, -1, self.label_ids].float()
            # One column: logit(yes) - logit(no), or logit(yes) alone without a no_token.
            return labels[:, :1] - labels[:, 1:2] if labels.shape[1] == 2 else labels


# ---------------------------------------------------------------------------------------------- export cache


def cache_root(config: ModelConfig) -> Path:
    root = config.cache_dir or os.environ.get("RERANK_CACHE_DIR") or "~/.cache/rerank"
    return Path(root).expanduser()


def artifact_dir(config: ModelConfig, fingerprint: str, what: str, **extra: Any) -> Path:
    """<cache>/<model name>-<hash of the model and the exporting libraries>/<what>[-<hash of its settings>]: a new
    model, revision, kind, export setting or converter version never reuses an old file."""
    import transformers

    parts = [fingerprint, config.kind, f"opset{ONNX_OPSET}", EXPORT_FORMAT, torch.__version__, transformers.__version__]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.name_or_path.rstrip("/").rsplit("/", 1)[-1])[:60] or "model"
    if extra:
        settings = "|".join(f"{k}={v}" for k, v in sorted(extra.items()))
        what += "-" + hashlib.sha256(settings.encode()).hexdigest()[:8]
    return cache_root(config) / f"{name}-{key}" / what


def cached(target: Path, build, what: str) -> Path:
    """Return `target`, building it first (once, under a file lock) if it is not there. `build(tmp_dir)` writes
    the artifact's files into a temporary folder that is renamed into place, so a crash leaves nothing half made."""
    from filelock import FileLock

    if target.is_dir() and (target / "_COMPLETE").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=3600):
        if (target / "_COMPLETE").is_file():  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / "_COMPLETE").write_text("")
            if target.exists():
                import shutil

                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        EXPORTS[what] += 1
        log.info("built %s in %s", what, target)
    return target


def _input_names(uses_tt: bool) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_tt else [])


def export_onnx(config: ModelConfig, fingerprint: str, uses_tt: bool) -> Path:
    """float32 ONNX of the features module (int32 inputs, dynamic batch and sequence axes), cached."""

    def build(tmp: Path) -> None:
        model = _Features(load_hf_model(config, "eager"), config.kind).eval()
        (tmp / "HEAD_ONLY").write_text(str(head_only_last_layer(model)))
        names = _input_names(uses_tt)
        example = tuple(torch.ones((2, 8), dtype=torch.int32) for _ in names)
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes["features"] = {0: "batch"}
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(tmp / "model.onnx"),
                input_names=names,
                output_names=["features"],
                dynamic_axes=axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )

    return cached(artifact_dir(config, fingerprint, "onnx-float32", tt=uses_tt), build, "onnx-float32") / "model.onnx"


#: Largest |difference| to the unfused export allowed for ONNX Runtime's transformer fusions (else unfused is kept).
FUSION_TOLERANCE = 1e-4


def _probe_feed(uses_tt: bool, vocab: int, rows: int = 4, length: int = 24) -> dict[str, np.ndarray]:
    """A small padded batch of random token ids (rows of different lengths) to compare two graphs on."""
    rng = np.random.default_rng(0)
    ids = rng.integers(min(5, vocab - 1), min(vocab, 2000), (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), dtype=np.int32)
    for r in range(1, rows):
        mask[r, length - 5 * r :] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    if uses_tt:
        tt = np.zeros_like(ids)
        tt[:, length // 2 :] = 1
        feed["token_type_ids"] = tt * mask
    return feed


def _ort_session(path: Path | str, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def fuse_onnx(config: ModelConfig, fingerprint: str, uses_tt: bool, hf_config) -> Path:
    """The float32 export with ONNX Runtime's transformer fusions for BERT-family encoders (EmbedLayerNormalization,
    Attention, SkipLayerNormalization, BiasGelu; `onnxruntime.transformers.optimizer`, opt_level 0 so the file
    stays portable), cached. The fused graph is compared with the unfused one on a padded probe batch; a
    difference above FUSION_TOLERANCE, or an architecture the optimizer does not know, keeps the unfused file
    (FUSED says which)."""
    src = export_onnx(config, fingerprint, uses_tt)
    model_type = getattr(hf_config, "model_type", "")
    heads = getattr(hf_config, "num_attention_heads", 0)
    hidden = getattr(hf_config, "hidden_size", 0)

    def build(tmp: Path) -> None:
        import shutil

        fused = False
        if model_type in HEAD_ONLY_MODEL_TYPES and heads and hidden:
            try:
                from onnxruntime.transformers.optimizer import optimize_model

                logging.disable(logging.INFO)  # the optimizer logs every fusion at INFO on its own loggers
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        opt = optimize_model(
                            str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0
                        )
                        opt.save_model_to_file(str(tmp / "model.onnx"))
                finally:
                    logging.disable(logging.NOTSET)
                feed = _probe_feed(uses_tt, int(getattr(hf_config, "vocab_size", 1000)))
                ref = _ort_session(src).run(None, feed)[0]
                got = _ort_session(tmp / "model.onnx").run(None, feed)[0]
                diff = float(np.abs(got - ref).max())
                fused = got.shape == ref.shape and diff <= FUSION_TOLERANCE
                if not fused:
                    log.info("ONNX Runtime fusions differ by %.2g from the export; keeping it unfused", diff)
            except Exception as err:  # noqa: BLE001 - any optimizer failure: keep the plain export
                log.info("ONNX Runtime fusions not usable for %s: %s", model_type, err)
        if not fused:
            shutil.copyfile(src, tmp / "model.onnx")
        (tmp / "FUSED").write_text(str(fused))
        (tmp / "HEAD_ONLY").write_text(str(export_is_head_only(src)))

    import onnxruntime

    target = artifact_dir(config, fingerprint, "onnx-float32-fused", tt=uses_tt, ort=onnxruntime.__version__)
    return cached(target, build, "onnx-float32-fused") / "model.onnx"


def export_is_fused(onnx_path: Path) -> bool:
    marker = onnx_path.parent / "FUSED"
    return marker.is_file() and marker.read_text().strip() == "True"


def export_is_head_only(onnx_path: Path) -> bool:
    """Whether an ONNX export (and so what is quantised or converted from it) has the head-only last layer."""
    marker = onnx_path.parent / "HEAD_ONLY"
    return marker.is_file() and marker.read_text().strip() == "True"


#: MatMul nodes of the first encoder layer (torch.onnx names them /<model>/encoder/layer.0/...): kept in float32.
_FIRST_LAYER = re.compile(r"/encoder/layers?\.0/")


def onnx_int8_settings() -> dict[str, Any]:
    """ONNX Runtime dynamic int8 settings for this CPU (part of the export's cache key).

    ONNX Runtime's default format, U8S8 (uint8 activations, int8 weights), multiplies on AVX2/AVX512 without VNNI
    with vpmaddubsw, whose 16-bit sum of two uint8 x int8 products saturates: that is what lost 1.5% nDCG@10 at
    K=100 on the AVX2 EPYC, while the same model kept it (-0.1%) on a VNNI EPYC, where vpdpbusd sums in 32 bits.
    Without VNNI the weights are therefore uint8 too (U8U8, widened to 16 bits before multiplying: no saturation):
    -0.9% at K=100 measured (its integer arithmetic does not depend on the CPU). 7-bit weights (reduce_range)
    also avoid saturation but lost 2.1%."""
    if vnni():
        return {"reduce_range": False, "per_channel": True, "float32_layers": "first"}
    return {"reduce_range": False, "per_channel": True, "float32_layers": "first", "weights": "uint8"}


def quantize_onnx_int8(config: ModelConfig, fingerprint: str, uses_tt: bool) -> Path:
    """ONNX Runtime dynamic quantisation: 8-bit weights with one scale per output channel (int8 with VNNI, uint8
    without: onnx_int8_settings), uint8 activations quantised per call, and the first encoder layer left in
    float32.

    Measured on the MiniLM weights (Cranfield, BM25 top 100, nDCG@10 against float32 torch, one run): per-tensor
    weights -3.5%, per-channel -1.7%, per-channel with the first layer in float32 -0.04% (the embeddings' sum and
    its layer norm are what 8-bit activations hurt most; the other five layers in int8 lost 1.4% when the last
    one was kept instead). The activation scale is per call, so a pair's score moves slightly with the other
    pairs of its micro-batch (README: the spread)."""
    src = export_onnx(config, fingerprint, uses_tt)
    settings = onnx_int8_settings()

    def build(tmp: Path) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        graph = onnx.load(str(src), load_external_data=False).graph
        keep = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and _FIRST_LAYER.search(n.name)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src),
                str(tmp / "model.onnx"),
                weight_type=QuantType.QUInt8 if settings.get("weights") == "uint8" else QuantType.QInt8,
                reduce_range=settings["reduce_range"],
                per_channel=settings["per_channel"],
                nodes_to_exclude=keep,
            )

    target = artifact_dir(config, fingerprint, "onnx-int8", tt=uses_tt, **settings)
    return cached(target, build, "onnx-int8") / "model.onnx"


def _calibration_inputs(tokenizer, config: ModelConfig, uses_tt: bool, max_length: int) -> list[dict[str, np.ndarray]]:
    """Model inputs for int8 calibration: (query, abstract) pairs of the Cranfield collection bundled with the
    package (half judged relevant, half not), or the texts alone for a bi-encoder. Activation ranges only; no
    labels are used."""
    from pipelines.evaluation.loaders import load_cranfield

    col = load_cranfield()
    qids = sorted(col.qrels, key=lambda q: int(q) if q.isdigit() else 0)
    docs = sorted(col.corpus)
    pairs = []
    for i, q in enumerate(qids):
        if len(pairs) >= CALIBRATION_PAIRS or q not in col.queries:
            continue
        rel = [d for d, g in col.qrels[q].items() if g > 0 and d in col.corpus]
        d = rel[0] if (i % 2 == 0 and rel) else docs[(i * 37) % len(docs)]
        pairs.append((col.queries[q], col.corpus[d]))
    names = _input_names(uses_tt)
    out = []
    for q, p in pairs:
        if config.kind == "cross-encoder":
            enc = tokenizer(q, p, truncation="longest_first", max_length=max_length)
        else:
            enc = tokenizer(p, truncation=True, max_length=max_length)
        item = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if uses_tt:
            item["token_type_ids"] = enc.get("token_type_ids") or [0] * len(enc["input_ids"])
        out.append({n: np.asarray([item[n]], dtype=np.int32) for n in names})
    return out


#: OpenVINO int8 on a CPU with native bfloat16: the operations left out of int8 run in bfloat16 instead of float32.
OPENVINO_INT8_BF16 = True


def openvino_int8_settings() -> dict[str, Any]:
    """NNCF static quantisation settings (part of the export's cache key): the first encoder layer's matmuls stay
    in float32 and SmoothQuant is off. Measured on the MiniLM weights (Cranfield, BM25 top 100, nDCG@10 against
    float32 at K = 10 / 20 / 100, a VNNI EPYC): NNCF's defaults -0.1% / -0.7% / -1.4%; first layer in float32
    +0.2% / -0.2% / -0.4%; that and no SmoothQuant +1.1% / +0.6% / +0.1%; the MIXED preset as the defaults."""
    return {"float32_layers": "first", "preset": "performance", "smooth_quant": False}


def export_openvino(config: ModelConfig, fingerprint: str, uses_tt: bool, dtype: str, tokenizer, max_length: int):
    """OpenVINO IR converted from the ONNX export (weights kept float32); for int8, NNCF static quantisation
    calibrated on the bundled Cranfield pairs. Cached."""
    src = export_onnx(config, fingerprint, uses_tt)

    def build_ir(tmp: Path) -> None:
        import openvino as ov

        ov.save_model(ov.convert_model(str(src)), str(tmp / "model.xml"), compress_to_fp16=False)

    import openvino as ov

    ver = ov.get_version()
    fp32 = cached(
        artifact_dir(config, fingerprint, "openvino-float32", tt=uses_tt, ov=ver), build_ir, "openvino-float32"
    )
    if dtype != "int8":
        return fp32 / "model.xml"

    settings = openvino_int8_settings()

    def build_int8(tmp: Path) -> None:
        import nncf

        core = ov.Core()
        model = core.read_model(str(fp32 / "model.xml"))
        data = _calibration_inputs(tokenizer, config, uses_tt, max_length)
        kwargs: dict[str, Any] = {}
        if settings["float32_layers"] == "first":
            names = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"]
            first = [n for n in names if _FIRST_LAYER.search(n)]
            if first:
                kwargs["ignored_scope"] = nncf.IgnoredScope(names=first)
        if settings["preset"] == "mixed":
            kwargs["preset"] = nncf.QuantizationPreset.MIXED
        if settings["smooth_quant"] is False:
            from nncf.quantization.advanced_parameters import (
                AdvancedQuantizationParameters,
                AdvancedSmoothQuantParameters,
            )

            off = AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
            kwargs["advanced_parameters"] = AdvancedQuantizationParameters(smooth_quant_alphas=off)
        quantized = nncf.quantize(
            model, nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(data), **kwargs
        )
        ov.save_model(quantized, str(tmp / "model.xml"), compress_to_fp16=False)

    import nncf

    target = artifact_dir(
        config,
        fingerprint,
        "openvino-int8",
        tt=uses_tt,
        ov=ver,
        nncf=nncf.__version__,
        n=CALIBRATION_PAIRS,
        max_length=max_length,
        **settings,
    )
    return cached(target, build_int8, "openvino-int8") / "model.xml"


def _hf_config(config: ModelConfig):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        config.name_or_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )


def _threads(config: ModelConfig) -> int:
    return config.num_threads or torch.get_num_threads()


class OnnxBackend(Backend):
    """ONNX Runtime on CPU: float32 (with its transformer fusions where they match; fuse_onnx), or dynamic int8."""

    name = "onnx"

    def __init__(self, config: ModelConfig, fingerprint: str, tokenizer):
        import onnxruntime as ort

        self.hf_config = _hf_config(config)
        self.uses_token_type_ids = uses_token_type_ids(tokenizer, self.hf_config)
        tt = self.uses_token_type_ids
        if config.dtype == "int8":
            path = quantize_onnx_int8(config, fingerprint, tt)
        else:
            path = fuse_onnx(config, fingerprint, tt, self.hf_config)
        #: ONNX Runtime's transformer fusions are in the graph (float32 only; see fuse_onnx).
        self.fused = export_is_fused(path)
        self.head_only = export_is_head_only(export_onnx(config, fingerprint, tt))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = _threads(config)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path = path

    def forward(self, input_ids, attention_mask, token_type_ids):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_type_ids:
            feed["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


class OpenVinoBackend(Backend):
    """OpenVINO on CPU: float32, bfloat16 (inference precision hint), int8 (NNCF static quantisation)."""

    name = "openvino"

    def __init__(self, config: ModelConfig, fingerprint: str, tokenizer, max_length: int):
        import openvino as ov

        self.hf_config = _hf_config(config)
        self.uses_token_type_ids = uses_token_type_ids(tokenizer, self.hf_config)
        path = export_openvino(config, fingerprint, self.uses_token_type_ids, config.dtype, tokenizer, max_length)
        self.head_only = export_is_head_only(export_onnx(config, fingerprint, self.uses_token_type_ids))
        precision = {"bfloat16": "bf16", "float16": "f16"}.get(config.dtype, "f32")
        if config.dtype == "int8" and OPENVINO_INT8_BF16 and native_bf16():
            precision = "bf16"  # what stays out of int8 (the first layer, softmax, layer norms) runs in bfloat16
        props = {"INFERENCE_NUM_THREADS": _threads(config), "INFERENCE_PRECISION_HINT": precision}
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", props)
        self.request = self.compiled.create_infer_request()
        self.path = path
        #: What OpenVINO actually computes in (it falls back to f32 where the CPU lacks bf16).
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(
            hint.to_string(), hint.to_string()
        )

    def forward(self, input_ids, attention_mask, token_type_ids):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_type_ids:
            feed["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        self.request.infer(feed)
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)


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
