"""The interface every backend implements (see the package doc)."""

from __future__ import annotations

from typing import Any

import numpy as np


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
    #: Set by load_backend on the torch backend that replaced an onnx/openvino one whose export failed or did not
    #: score like torch: the record of the choice (resolve_auto's shape, with `fallback` the one-line reason).
    fallback: dict | None = None
    #: Left-padded rows score as unpadded ones (positions from the mask). Exports take no position ids: the
    #: Scorer pads right for a backend without it.
    pads_left: bool = False

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
