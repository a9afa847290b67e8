"""The model layer, free of Ray: ``encoding`` (pairs -> token ids), ``scoring`` (the Scorer: micro-batches and
scores), ``backends`` (torch, ONNX Runtime, OpenVINO; which one runs where; exports)."""
