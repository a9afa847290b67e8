"""Which backend and precision run on a device: CPU flags and families, the `auto` rules, the plan-time check
(`check_backend`), and the device a model will run on (`planned_device` before Ray starts, `actor_device` in an
actor or replica that knows its GPUs). Whether the caller joins a cluster is passed in, never looked up here."""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.errors import ConfigError

if TYPE_CHECKING:  # annotations only: jobs/gpu_check.py runs the torch backend without pydantic
    from pipelines.config import ModelConfig

log = logging.getLogger(__name__)


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
#: float32 torch at K = 10, 20 and 100 on Cranfield (docs/backends.md), each taken only when its
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


#: The backends that score an export of the model (ONNX, and OpenVINO's IR converted from it).
EXPORTED_BACKENDS = ("onnx", "openvino")


@lru_cache(maxsize=64)
def _auto_map(name_or_path: str, revision: str | None) -> tuple[str, ...]:
    """The auto_map keys of a model's config.json, read as JSON (no code runs); empty when it has none or the file
    cannot be read here."""
    try:
        from transformers import PretrainedConfig

        raw, _ = PretrainedConfig.get_config_dict(name_or_path, revision=revision)
    except Exception:  # noqa: BLE001 - unreadable here: the model's own load reports it
        return ()
    return tuple(sorted(raw.get("auto_map") or {}))


def remote_code_reason(config: ModelConfig) -> str | None:
    """Why a model is not exported at all, or None: its own modeling code (model.trust_remote_code and an auto_map
    in its config.json) is run by torch only; the ONNX exporter is not tried on it."""
    if not getattr(config, "trust_remote_code", False) or getattr(config, "kind", "") == "causal-lm":
        return None
    if not _auto_map(config.name_or_path, config.revision):
        return None
    return "the model runs its own code (trust_remote_code and an auto_map in its config.json), which is not exported"


def torch_dtype_for(dtype: str) -> str:
    """The torch CPU precision that replaces an onnx/openvino `dtype` when torch scores the model instead: float32
    and bfloat16 stay; auto, int8 and float16 become bfloat16 with native bfloat16, else float32."""
    if dtype in ("float32", "bfloat16"):
        return dtype
    return "bfloat16" if native_bf16() else "float32"


def fallback_choice(
    requested: str, backend: str, dtype: str, torch_dtype: str, why: str, device: torch.device
) -> dict[str, Any]:
    """The record of an onnx/openvino choice replaced by torch (the shape of resolve_auto's), `why` in one line."""
    flags = sorted(cpu_flags() & set(AUTO_FLAGS), key=AUTO_FLAGS.index)
    return {
        "requested": requested,
        "backend": "torch",
        "dtype": torch_dtype,
        "reason": f"{backend} {dtype} not used: {why}; torch scores it",
        "fallback": why,
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_family": cpu_family(),
        "cpu_flags": flags,
    }


def resolve_auto(config: ModelConfig, device: torch.device) -> tuple[ModelConfig, dict[str, Any] | None]:
    """`config` with model.backend / model.dtype auto replaced by what runs on `device`, and a record of the
    choice (None when neither was auto): requested, backend, dtype, reason, device, cpu, cpu_family, cpu_flags.

    onnx or openvino, asked for or chosen, on a model with its own code (remote_code_reason) becomes torch
    (torch_dtype_for), with the record's `fallback` saying why: such a model is never exported. Exports that fail
    or do not score like torch are found when the backend loads (load_backend) and fall back there.

    Rules (no timing: the same machine always gets the same answer, so a job's driver and its actors agree):
    - CUDA: torch, bfloat16 where the GPU has it (torch.cuda.is_bf16_supported), else float16; float32 only when
      model.dtype asks for it (a driver that sees no GPU answers float16, which every GPU runs);
    - CPU, causal-lm: torch, bfloat16 autocast with native bfloat16, else float32;
    - CPU, cross-encoder / bi-encoder: the first of AUTO_CPU_ORDER[cpu_family()] whose packages are installed,
      else torch (bfloat16 autocast with native bfloat16, else float32);
    - a fixed backend with dtype auto: that backend's best dtype by the same order; a fixed dtype with backend
      auto: the first backend of the order with that dtype, else the first that runs it."""
    resolved, choice = _resolve(config, device)
    if device.type == "cpu" and resolved.backend in EXPORTED_BACKENDS:
        why = remote_code_reason(config)
        if why:
            dtype = torch_dtype_for(config.dtype)
            record = fallback_choice(
                f"{config.backend}/{config.dtype}", resolved.backend, resolved.dtype, dtype, why, device
            )
            return config.model_copy(update={"backend": "torch", "dtype": dtype}), record
    return resolved, choice


def _resolve(config: ModelConfig, device: torch.device) -> tuple[ModelConfig, dict[str, Any] | None]:
    """resolve_auto before the remote-code rule."""
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
    """Log what auto chose, once per process and choice, in one line (a WARNING when it replaced onnx/openvino by
    torch: `fallback`)."""
    if not choice or "backend" not in choice:
        return
    key = (choice["requested"], choice["backend"], choice["dtype"], choice.get("device"))
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    log.log(
        logging.WARNING if choice.get("fallback") else logging.INFO,
        "model.backend/dtype %s -> %s %s on %s (%s; CPU %s, flags %s)",
        choice["requested"],
        choice["backend"],
        choice["dtype"],
        choice.get("device"),
        choice["reason"],
        choice.get("cpu") or cpu_name(),
        " ".join(choice.get("cpu_flags") or ()) or "none",
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


def planned_device(config: ModelConfig, on_cluster: bool = False) -> torch.device | None:
    """The device the model will run on, as far as this process can tell before Ray starts: model.device when
    set; with auto, this machine's (CUDA when present) for a local Ray. None when the workers of a cluster decide:
    auto, and the caller joins a cluster (`on_cluster`: the entry point knows, e.g. RAY_ADDRESS is set), whose
    workers may have GPUs this machine lacks, or none."""
    if config.device != "auto":
        return torch.device(config.device)
    if on_cluster:
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


def check_model_config(config: ModelConfig, on_cluster: bool) -> None:
    """What entry points call before starting Ray: check_model_on the planned device (`on_cluster`: the entry
    point joins a cluster, whose workers decide the device)."""
    check_model_on(config, planned_device(config, on_cluster))


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
