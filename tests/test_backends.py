"""Backends (torch, ONNX Runtime, OpenVINO) x dtypes against torch float32 on tiny models; the export cache;
plan-time refusals; token-budget micro-batches."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch

from pipelines.config import ModelConfig
from pipelines.engine.ray_runtime import joins_cluster
from pipelines.errors import ConfigError
from pipelines.model import backends
from pipelines.model.backends import selection
from pipelines.model.scoring import Scorer, cut_micro_batches, describe_model

QUERIES = ["what is the boundary layer", "heat transfer at mach 3", "shock wave on a wing"] * 8
PASSAGES = ["the boundary layer of a wing in supersonic flow " * (1 + i % 5) + f"case {i}" for i in range(len(QUERIES))]

# (backend, dtype, max abs difference to torch float32, or None: rank agreement only). The tiny models have a
# wide random init (scores spread over several units), so int8's error is large in absolute terms here; its
# quality on real weights is judged by nDCG@10 (README).
CASES = [
    ("torch", "bfloat16", 0.25, 0.95),
    ("onnx", "float32", 1e-4, 0.999),
    ("onnx", "int8", None, 0.6),
    ("openvino", "float32", 1e-4, 0.999),
    ("openvino", "bfloat16", 0.25, 0.95),
    ("openvino", "int8", None, 0.3),
]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("backend,dtype,atol,rho", CASES, ids=[f"{b}-{d}" for b, d, _, _ in CASES])
def test_cross_encoder_backend_matches_torch_float32(tiny_cross_encoder, tmp_path_factory, backend, dtype, atol, rho):
    cache = str(tmp_path_factory.getbasetemp() / "rerank-cache")
    base = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128)).score(QUERIES, PASSAGES)
    cfg = ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, backend=backend, dtype=dtype, cache_dir=cache)
    got = Scorer(cfg).score(QUERIES, PASSAGES)
    assert got.dtype == np.float32 and got.shape == base.shape and np.isfinite(got).all()
    if atol is not None:
        np.testing.assert_allclose(got, base, atol=atol)
    assert _spearman(got, base) >= rho


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_two_label_and_bi_encoder_backends(tiny_cross_encoder_2labels, tiny_bi_encoder, tmp_path, backend):
    for path, kind in ((tiny_cross_encoder_2labels, "cross-encoder"), (tiny_bi_encoder, "bi-encoder")):
        base = Scorer(ModelConfig(name_or_path=path, kind=kind, max_length=128))
        other = Scorer(
            ModelConfig(name_or_path=path, kind=kind, max_length=128, backend=backend, cache_dir=str(tmp_path))
        )
        np.testing.assert_allclose(other.score(QUERIES, PASSAGES), base.score(QUERIES, PASSAGES), atol=1e-4)
        if kind == "cross-encoder":
            np.testing.assert_allclose(other.logits(QUERIES, PASSAGES), base.logits(QUERIES, PASSAGES), atol=1e-4)
        else:
            np.testing.assert_allclose(other.embed(PASSAGES), base.embed(PASSAGES), atol=1e-5)


@pytest.mark.parametrize(
    "arch,extra,head_only",
    [
        ("bert", {}, True),
        ("roberta", {}, True),
        ("xlm-roberta", {}, True),
        ("electra", {}, True),
        ("bert", {"position_embedding_type": "relative_key"}, False),  # relative positions: the full layer stays
    ],
)
def test_last_layer_for_the_first_token_scores_like_the_full_model(tmp_path, arch, extra, head_only):
    """The torch backend computes a cross-encoder's last layer for the first token only (all its head reads);
    scores, padded batches of mixed lengths included, equal the unmodified Hugging Face model's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests import tiny_models

    path = str(tiny_models.build_encoder_classifier(tmp_path / arch, arch, **extra))
    scorer = Scorer(ModelConfig(name_or_path=path, max_length=128, max_batch_tokens=600))
    assert scorer.backend.head_only is head_only
    got = scorer.score(QUERIES, PASSAGES)
    tok = AutoTokenizer.from_pretrained(path)
    full = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    enc = tok(QUERIES, PASSAGES, padding=True, truncation=True, max_length=128, return_tensors="pt")
    if full.config.type_vocab_size < 2:
        enc.pop("token_type_ids", None)
    with torch.inference_mode():
        ref = full(**enc).logits[:, 0].numpy()
    assert np.ptp(ref) > 0.5  # the scores differ enough for a wrong layer to show
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_last_layer_is_whole_for_bi_encoders(tiny_bi_encoder):
    assert Scorer(ModelConfig(name_or_path=tiny_bi_encoder, kind="bi-encoder")).backend.head_only is False


def test_export_happens_once_and_is_reused(tiny_cross_encoder, tmp_path):
    cfg = ModelConfig(
        name_or_path=tiny_cross_encoder, max_length=128, backend="onnx", dtype="int8", cache_dir=str(tmp_path)
    )
    before = dict(backends.EXPORTS)
    # Concurrent loads (as several actors on one node): the file lock makes one of them export, the rest wait.
    scorers: list[Scorer] = []
    threads = [threading.Thread(target=lambda: scorers.append(Scorer(cfg))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(scorers) == 3
    assert backends.EXPORTS["onnx-float32"] - before.get("onnx-float32", 0) == 1
    assert backends.EXPORTS["onnx-int8"] - before.get("onnx-int8", 0) == 1
    files = sorted(tmp_path.rglob("*.onnx"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = Scorer(cfg)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert backends.EXPORTS["onnx-int8"] - before.get("onnx-int8", 0) == 1
    np.testing.assert_allclose(again.score(QUERIES, PASSAGES), scorers[0].score(QUERIES, PASSAGES), atol=1e-6)
    # OpenVINO converts from the same ONNX export: no second ONNX export.
    Scorer(cfg.model_copy(update={"backend": "openvino", "dtype": "float32"}))
    assert backends.EXPORTS["onnx-float32"] - before.get("onnx-float32", 0) == 1

    # The int8 model: per-channel weights, the first encoder layer left in float32, the head-only last layer.
    import onnx

    assert again.backend.head_only
    graph = onnx.load(str(again.backend.path)).graph
    first = [n.op_type for n in graph.node if "/encoder/layer.0/" in n.name and "MatMul" in n.op_type]
    rest = [n.op_type for n in graph.node if "/encoder/layer.1/" in n.name and "MatMul" in n.op_type]
    assert first and set(first) == {"MatMul"}
    assert "MatMulInteger" in rest
    scales = [i for i in graph.initializer if i.name.endswith("_scale")]
    assert any(len(i.dims) == 1 and i.dims[0] > 1 for i in scales)  # one weight scale per output channel


@pytest.mark.parametrize(
    "backend,dtype,device,message",
    [
        ("torch", "int8", "cpu", "deprecated"),
        ("torch", "float16", "cpu", "no fast float16 CPU kernels"),
        ("onnx", "bfloat16", "cpu", "no fast bfloat16 matmul"),
        ("onnx", "float16", "cpu", "no fast float16 matmul"),
        ("onnx", "float32", "cuda", "runs on CPU only"),
        ("openvino", "int8", "cuda", "runs on CPU only"),
    ],
)
def test_unsupported_combinations_are_refused_at_plan_time(tiny_cross_encoder, backend, dtype, device, message):
    cfg = ModelConfig(name_or_path=tiny_cross_encoder, backend=backend, dtype=dtype, device=device)
    with pytest.raises(ConfigError, match=message) as err:
        describe_model(cfg)
    assert "\n" not in str(err.value)


def test_a_cluster_job_is_checked_on_its_actors_device(tiny_cross_encoder, monkeypatch):
    """A driver without a GPU joining a cluster (RAY_ADDRESS, as `ray job submit` sets it) cannot see the workers'
    GPUs: before Ray starts it refuses only what no device runs; once the actors' GPUs are known, their device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fp16 = ModelConfig(name_or_path=tiny_cross_encoder, dtype="float16")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert backends.planned_device(fp16, joins_cluster()) == torch.device(
        "cpu"
    )  # a local Ray: the actors are on this machine
    with pytest.raises(ConfigError, match="no fast float16 CPU kernels"):
        describe_model(fp16)
    assert describe_model(fp16, on_cluster=True)["device"] == "auto (the actors')"  # as `rerank submit` plans
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert backends.planned_device(fp16, joins_cluster()) is None
    info = describe_model(fp16, joins_cluster())  # float16 runs on the workers' GPUs
    assert info["device"] == "auto (the actors')" and info["max_batch_tokens"] == "auto"
    with pytest.raises(ConfigError, match="no fast float16 matmul"):  # no device runs onnx float16
        describe_model(ModelConfig(name_or_path=tiny_cross_encoder, backend="onnx", dtype="float16"))
    assert backends.planned_device(fp16.model_copy(update={"device": "cpu"}), True) == torch.device("cpu")

    assert backends.actor_device(fp16, 1.0) == torch.device("cuda")
    assert backends.actor_device(fp16, 0.5) == torch.device("cuda")
    assert backends.actor_device(fp16, 0.0) == torch.device("cpu")
    with pytest.raises(ConfigError, match="the actors get no GPU"):
        backends.actor_device(fp16.model_copy(update={"device": "cuda"}), 0.0)
    backends.check_model_on(fp16, torch.device("cuda"))
    with pytest.raises(ConfigError, match="no fast float16 CPU kernels"):
        backends.check_model_on(fp16, backends.actor_device(fp16, 0.0))


def test_float16_openvino_refused_without_native_support(tiny_cross_encoder, monkeypatch):
    monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(ConfigError, match="avx512_fp16"):
        describe_model(ModelConfig(name_or_path=tiny_cross_encoder, backend="openvino", dtype="float16"))


def test_bfloat16_without_native_support_warns(tiny_cross_encoder, monkeypatch, caplog):
    monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset({"avx2"}))
    warned = backends.check_backend(ModelConfig(name_or_path=tiny_cross_encoder, dtype="bfloat16"), torch.device("cpu"))
    assert len(warned) == 1 and "no native bfloat16" in warned[0]
    monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert (
        backends.check_backend(ModelConfig(name_or_path=tiny_cross_encoder, dtype="bfloat16"), torch.device("cpu"))
        == []
    )
    info = describe_model(ModelConfig(name_or_path=tiny_cross_encoder, backend="onnx", dtype="int8"))
    assert info["backend"] == "onnx" and info["dtype"] == "int8" and info["max_batch_tokens"] == 2048


def test_micro_batches_fill_a_token_budget(tiny_cross_encoder):
    scorer = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, max_batch_tokens=100, batch_size=6))
    lengths = [int(x) for x in np.random.default_rng(0).integers(3, 60, size=200)] + [150]
    ordered = np.sort(lengths)[::-1]  # units come sorted, longest first (pipelines.model.encoding)
    batches = cut_micro_batches(ordered, scorer.max_batch_tokens, scorer.config.batch_size)
    assert batches[0][0] == 0 and batches[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(batches))  # contiguous slices, nothing left out
    for a, b in batches:
        longest = int(ordered[a:b].max())
        assert b - a <= 6
        assert (b - a) * longest <= 100 or b - a == 1
    assert batches[0] == (0, 1)  # longer than the budget: alone, first
    # Scores do not depend on the budget (each pass is padded to its own longest pair).
    wide = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, max_batch_tokens=100_000))
    np.testing.assert_allclose(scorer.score(QUERIES, PASSAGES), wide.score(QUERIES, PASSAGES), atol=1e-5)
    assert scorer.stats["padded_tokens"] >= scorer.stats["tokens"] > 0


def test_tokenisation_runs_ahead_in_blocks(tiny_cross_encoder, monkeypatch):
    """Many blocks: results stay in input order, whatever the block boundaries."""
    from pipelines.model import scoring

    plain = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128))
    expected = plain.score(QUERIES * 3, PASSAGES * 3)
    monkeypatch.setattr(scoring, "BLOCK_ROWS", 7)
    monkeypatch.setattr(scoring, "MIN_BLOCK_ROWS", 7)
    blocked = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128))
    np.testing.assert_allclose(blocked.score(QUERIES * 3, PASSAGES * 3), expected, atol=1e-5)
    assert blocked._tokenize_pool is not None


def test_service_batches_by_pairs_and_token_budget():
    """The service's @serve.batch cost: a model call stays within serve.max_batch_pairs and the token budget."""
    from pipelines.serve.app import _batch_cost, _Chunk, _split

    texts = ["x" * 40] * 10 + ["y" * 400] * 3 + ["z" * 4000]
    chunks = _split("q" * 8, texts, 4, 300, 512)
    assert [(a, b) for a, b, _ in chunks] == [(0, 4), (4, 8), (8, 10), (10, 12), (12, 13), (13, 14)]
    assert all(t <= 300 for _, _, t in chunks)  # a pair over the budget alone is counted at the budget
    limits = (4, 300)
    made = [_Chunk(0, "q", texts[a:b], t, limits) for a, b, t in chunks]
    budget = 4 * 300
    assert all(_batch_cost([c]) <= budget for c in made)
    assert _batch_cost(made[:2]) > budget  # 8 pairs
    small = [_Chunk(0, "q", ["a"], 20, limits), _Chunk(1, "q", ["b"], 20, limits)]
    assert _batch_cost(small) <= budget
    assert _batch_cost(small + [_Chunk(2, "q", ["c"], 280, limits)]) > budget  # 320 tokens
