"""onnx / openvino on every reranker family: the export is verified against torch, and a model that cannot be
exported or verified (remote code, an exporter error, a graph that scores differently) is scored by torch with
one log line saying why, and reported as torch. Never a crash, never a silently different score."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import ModelConfig
from pipelines.model import backends
from pipelines.model.backends import export, selection
from pipelines.model.scoring import Scorer, describe_model

QUERIES = ["what is the boundary layer", "heat transfer at mach 3", "shock wave on a wing"] * 3
PASSAGES = ["the boundary layer of a wing in supersonic flow " * (1 + i % 4) + f"case {i}" for i in range(len(QUERIES))]
AVX2 = frozenset({"avx", "avx2", "fma"})  # a CPU on which auto picks onnx float32 (test_backend_auto)


def _decoder(path, arch: str) -> str:
    """A two-layer decoder sequence classifier (qwen3 or llama) with the Cranfield byte-level BPE tokenizer of
    tests/tiny_models.py and no pad token in the tokenizer or the config, as many decoder checkpoints ship: the
    export must be traced with the pad id the Scorer pads with (eos), or it cannot find each row's last token."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from tests import tiny_models

    if arch == "qwen3":
        return str(tiny_models.build_decoder_classifier(path))
    tiny_models._write_bpe_tokenizer(path, "right", pad_token=False)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.for_model(
        arch,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=0.5,
        num_labels=1,
        pad_token_id=None,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    return str(path)


def _modernbert(path) -> str:
    """A two-layer ModernBertForSequenceClassification with the tiny BERT tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from tests import tiny_models

    tiny_models._write_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.for_model(
        "modernbert",
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        classifier_pooling="mean",
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    out = {arch: _decoder(root / arch, arch) for arch in ("qwen3", "llama")}
    out["modernbert"] = _modernbert(root / "modernbert")
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("export-cache"))


@pytest.fixture
def warnings_seen():
    """The WARNING (and above) messages of the backends package while the test runs (pytest's logging plugin is
    off in this project), with the once-per-process log of auto's choice reset."""
    selection._LOGGED.clear()
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("pipelines.model.backends")
    logger.addHandler(handler)
    yield lambda: list(messages)
    logger.removeHandler(handler)


def _verdicts(cache: str, path: str, what: str = "onnx-float32") -> list[dict]:
    """The VERIFY.json records of a model's exports of kind `what` in the cache."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return [json.loads(f.read_text()) for f in sorted(Path(cache).glob(f"{name}-*/{what}-*/VERIFY.json"))]


def _check_against_torch(scorer: Scorer, path: str, cache: str, seen: list[str]) -> None:
    """Either the export ran and scores as torch float32 does within the export tolerance, or the fallback
    happened: torch runs it, it is reported, and one log line said why."""
    base = Scorer(ModelConfig(name_or_path=path, max_length=128)).score(QUERIES, PASSAGES)
    got = scorer.score(QUERIES, PASSAGES)
    assert np.isfinite(got).all() and got.shape == base.shape
    assert np.ptp(base) > 0.1  # the scores differ enough for a wrong graph to show
    assert scorer.info.backend == scorer.backend.name == scorer.config.backend
    if scorer.backend.name == "torch":
        assert scorer.backend_choice and scorer.backend_choice["fallback"]
        assert len(seen) == 1 and "torch" in seen[0] and "\n" not in seen[0]
        np.testing.assert_allclose(got, base, atol=1e-5)
        return
    assert not seen and scorer.config.dtype == "float32"
    np.testing.assert_allclose(got, base, atol=backends.EXPORT_TOLERANCE * (1 + float(np.abs(base).max())))
    verdicts = _verdicts(cache, path)
    assert verdicts and all(v["ok"] and v["max_abs_diff"] <= v["tolerance"] for v in verdicts)
    assert all(v["probe"].endswith(f"right-padded with id {scorer.encoder.pad_token_id}") for v in verdicts)


CASES = [
    *((arch, "onnx", "float32") for arch in ("qwen3", "llama", "modernbert")),
    *((arch, "auto", "auto") for arch in ("qwen3", "llama", "modernbert")),
    ("qwen3", "openvino", "float32"),  # the IR is converted from the verified ONNX export, and checked itself
]


@pytest.mark.parametrize("arch,backend,dtype", CASES, ids=["-".join(c) for c in CASES])
def test_decoder_and_modernbert_classifiers_export_or_fall_back(
    families, cache, warnings_seen, monkeypatch, arch, backend, dtype
):
    if backend == "auto":
        monkeypatch.setattr(selection, "cpu_flags", lambda: AVX2)  # auto picks onnx float32 on this CPU family
    cfg = ModelConfig(name_or_path=families[arch], max_length=128, backend=backend, dtype=dtype, cache_dir=cache)
    scorer = Scorer(cfg)
    _check_against_torch(scorer, families[arch], cache, warnings_seen())
    if backend == "openvino" and scorer.backend.name == "openvino":
        assert all(v["ok"] for v in _verdicts(cache, families[arch], "openvino-float32"))


def _sim_model(path) -> str:
    from tests import tiny_models

    return str(tiny_models.build_simulated_accelerator(path, pairs_per_s=1e6))


@pytest.mark.parametrize("backend,dtype", [("auto", "auto"), ("onnx", "float32"), ("openvino", "int8")])
def test_remote_code_goes_to_torch_without_an_export(tmp_path, warnings_seen, monkeypatch, backend, dtype):
    """A model with its own code (trust_remote_code and an auto_map) is never exported: torch scores it, one
    WARNING says why, and both the plan-time description and the Scorer report torch."""
    monkeypatch.setattr(selection, "cpu_flags", lambda: AVX2)  # auto would pick onnx float32 here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = _sim_model(tmp_path / "remote")
    cache = tmp_path / "cache"
    cfg = ModelConfig(
        name_or_path=path, trust_remote_code=True, backend=backend, dtype=dtype, cache_dir=str(cache), max_length=64
    )
    before = dict(backends.EXPORTS)
    info = describe_model(cfg)
    assert (info["backend"], info["dtype"]) == ("torch", "float32")
    assert "own code" in info["backend_choice"]["fallback"]
    scorer = Scorer(cfg)
    assert scorer.backend.name == scorer.info.backend == "torch" and scorer.config.dtype == "float32"
    assert "own code" in scorer.info.backend_choice["fallback"]
    assert scorer.info.backend_choice["requested"] == f"{backend}/{dtype}"
    seen = warnings_seen()
    assert len(seen) == 1 and "own code" in seen[0] and "-> torch float32" in seen[0] and "\n" not in seen[0]
    assert dict(backends.EXPORTS) == before and not cache.exists()  # nothing was exported
    torch_cfg = cfg.model_copy(update={"backend": "torch", "dtype": "float32"})
    np.testing.assert_allclose(scorer.score(QUERIES, PASSAGES), Scorer(torch_cfg).score(QUERIES, PASSAGES))


def test_an_exporter_error_falls_back_once_and_is_remembered(tiny_cross_encoder, tmp_path, warnings_seen, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Exporting the operator 'aten::fancy_op' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", broken)
    cfg = ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, backend="onnx", cache_dir=str(tmp_path))
    scorer = Scorer(cfg)
    assert scorer.backend.name == scorer.info.backend == "torch" and calls == [1]
    seen = warnings_seen()
    assert len(seen) == 1 and "\n" not in seen[0]
    assert "the ONNX export failed: RuntimeError: Exporting the operator 'aten::fancy_op'" in seen[0]
    assert "aten::fancy_op" in scorer.info.backend_choice["fallback"]
    (verdict,) = _verdicts(str(tmp_path), tiny_cross_encoder)
    assert verdict["ok"] is False and "fancy_op" in verdict["error"]
    assert not list(tmp_path.rglob("*.onnx"))
    # The refusal is cached: the next load (another actor) does not try the exporter again.
    again = Scorer(cfg.model_copy(update={"backend": "openvino"}))
    assert again.backend.name == "torch" and calls == [1]
    base = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128)).score(QUERIES, PASSAGES)
    np.testing.assert_allclose(again.score(QUERIES, PASSAGES), base, atol=1e-6)


@pytest.mark.parametrize("where", ["onnx", "openvino"])
def test_an_export_that_scores_differently_is_not_used(tiny_cross_encoder, tmp_path, warnings_seen, monkeypatch, where):
    """A graph off by more than the tolerance on the probe (here made so) is refused with the drift measured; the
    OpenVINO IR is checked against the same torch outputs as the ONNX export it is converted from."""
    runner = "_run_graph" if where == "onnx" else "_run_openvino"
    real = getattr(export, runner)
    monkeypatch.setattr(export, runner, lambda path, feed: real(path, feed) + 0.5)
    cfg = ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, backend=where, cache_dir=str(tmp_path))
    scorer = Scorer(cfg)
    assert scorer.backend.name == scorer.info.backend == "torch"
    seen = warnings_seen()
    what = "ONNX export" if where == "onnx" else "OpenVINO conversion"
    assert len(seen) == 1 and f"its {what} differs from torch by 0.5" in seen[0] and "\n" not in seen[0]
    (verdict,) = _verdicts(str(tmp_path), tiny_cross_encoder, f"{where}-float32")
    assert verdict["ok"] is False and verdict["max_abs_diff"] == pytest.approx(0.5, abs=1e-3)
    assert verdict["max_abs_diff"] > verdict["tolerance"]


def test_a_runtime_that_cannot_load_the_export_falls_back(tiny_cross_encoder, tmp_path, warnings_seen, monkeypatch):
    cfg = ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, backend="onnx", cache_dir=str(tmp_path))
    assert Scorer(cfg).backend.name == "onnx"  # exported and verified; cached
    import onnxruntime

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : this build has no kernel for it\nmore")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    scorer = Scorer(cfg)
    assert scorer.backend.name == scorer.info.backend == "torch"
    seen = warnings_seen()
    assert len(seen) == 1 and "onnx cannot load the export (RuntimeError: [ONNXRuntimeError]" in seen[0]


def test_bert_still_exports_fused_and_verified(tiny_cross_encoder, tmp_path, warnings_seen):
    cfg = ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, backend="onnx", cache_dir=str(tmp_path))
    scorer = Scorer(cfg)
    assert scorer.backend.name == scorer.info.backend == "onnx" and scorer.info.backend_choice is None
    assert scorer.backend.fused and scorer.backend.head_only and not warnings_seen()
    (verdict,) = _verdicts(str(tmp_path), tiny_cross_encoder)
    assert verdict["ok"] and verdict["max_abs_diff"] < 1e-4 and "right-padded with id 0" in verdict["probe"]
    base = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128)).score(QUERIES, PASSAGES)
    np.testing.assert_allclose(scorer.score(QUERIES, PASSAGES), base, atol=1e-4)
