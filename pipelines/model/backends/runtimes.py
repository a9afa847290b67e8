"""The CPU runtimes: ONNX Runtime (float32 with its fusions, or dynamic int8) and OpenVINO (float32, bfloat16,
static int8), each scoring the cached export of `export`. Constructing one raises export.ExportRefused when the
model's export failed or does not score like torch (load_backend then scores with torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipelines.model.backends.base import Backend
from pipelines.model.backends.export import (
    OPENVINO_INT8_BF16,
    export_is_fused,
    export_is_head_only,
    export_onnx,
    export_openvino,
    fuse_onnx,
    quantize_onnx_int8,
)
from pipelines.model.backends.selection import native_bf16
from pipelines.model.encoding import uses_token_type_ids

if TYPE_CHECKING:
    from pipelines.config import ModelConfig


def _hf_config(config: ModelConfig):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        config.name_or_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )


def _threads(config: ModelConfig) -> int:
    return config.num_threads or torch.get_num_threads()


def _pad_id(tokenizer) -> int:
    """The id the Scorer pads with (PairEncoder.pad_token_id): the export is traced and verified with it."""
    return getattr(tokenizer, "pad_token_id", None) or 0


class OnnxBackend(Backend):
    """ONNX Runtime on CPU: float32 (with its transformer fusions where they match; fuse_onnx), or dynamic int8."""

    name = "onnx"

    def __init__(self, config: ModelConfig, fingerprint: str, tokenizer):
        import onnxruntime as ort

        self.hf_config = _hf_config(config)
        self.uses_token_type_ids = uses_token_type_ids(tokenizer, self.hf_config)
        tt, pad = self.uses_token_type_ids, _pad_id(tokenizer)
        if config.dtype == "int8":
            path = quantize_onnx_int8(config, fingerprint, tt, pad)
        else:
            path = fuse_onnx(config, fingerprint, tt, self.hf_config, pad)
        #: ONNX Runtime's transformer fusions are in the graph (float32 only; see fuse_onnx).
        self.fused = export_is_fused(path)
        self.head_only = export_is_head_only(export_onnx(config, fingerprint, tt, pad))
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
        tt, pad = self.uses_token_type_ids, _pad_id(tokenizer)
        path = export_openvino(config, fingerprint, tt, config.dtype, tokenizer, max_length, pad)
        self.head_only = export_is_head_only(export_onnx(config, fingerprint, tt, pad))
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
