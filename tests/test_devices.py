"""model.device against what an actor or replica sees: Ray numbers the GPUs it reserved from cuda:0."""

from __future__ import annotations

import pytest
import torch

from pipelines.config import ModelConfig
from pipelines.errors import ConfigError
from pipelines.model.backends import actor_device


@pytest.mark.parametrize(
    "device, gpus, expected",
    [("auto", 0, "cpu"), ("auto", 1, "cuda"), ("cuda", 0.5, "cuda"), ("cuda:0", 1, "cuda:0"), ("cuda:1", 2, "cuda:1")],
)
def test_a_device_the_actor_sees(device, gpus, expected):
    assert actor_device(ModelConfig(name_or_path="m", device=device), gpus) == torch.device(expected)


@pytest.mark.parametrize("device, gpus", [("cuda:1", 1), ("cuda:2", 2), ("cuda:1", 0.5), ("cuda", 0)])
def test_a_device_no_actor_can_see_is_refused_before_any_starts(device, gpus):
    with pytest.raises(ConfigError, match=rf"model.device is {device}"):
        actor_device(ModelConfig(name_or_path="m", device=device), gpus)


def test_an_out_of_memory_batch_is_split_and_scores_are_unchanged(tiny_cross_encoder):
    """A backend that runs out of device memory above a token count: the batch is split in halves until it
    fits; the scores equal the unsplit reference and later batches start below the failing size."""
    import numpy as np

    from pipelines.model.scoring import Scorer
    from tests.datasets import make_pairs

    pairs = make_pairs(num_queries=6, per_query=9, seed=7)
    queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
    config = ModelConfig(name_or_path=tiny_cross_encoder, max_length=96, max_batch_tokens=4096, batch_size=64)
    reference = Scorer(config).score(queries, texts)
    scorer = Scorer(config)
    real, seen = scorer.backend.forward_device, []

    def forward(ids, mask, types):
        seen.append(ids.size)
        if ids.size > 600:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ids, mask, types)

    scorer.backend.forward_device = forward  # what the model side calls per micro-batch
    np.testing.assert_allclose(scorer.score(queries, texts), reference, atol=1e-5)
    assert scorer.stats["oom_splits"] > 0 and max(seen) > 600
    assert scorer.max_batch_tokens < 4096  # later batches start below what failed

    def broken(ids, mask, types):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    scorer.backend.forward_device = broken  # even one row does not fit: the error stands
    with pytest.raises(torch.cuda.OutOfMemoryError):
        scorer.score(queries[:3], texts[:3])


# ---------------------------------------------------------------------------------------------- the GPU path


def test_gpu_token_budget_formula():
    """budget = fraction x (free - weights) / (layers x hidden x k x dtype bytes), clamped and rounded down."""
    from pipelines.model.backends import gpu_batch_tokens

    gib = 1 << 30
    # BERT-base in bfloat16: 12 x 768 x 16 x 2 = 294,912 bytes per token.
    assert gpu_batch_tokens(80 * gib, 0.2 * gib, 12, 768, 2) == 131072  # clamped to the top of the range
    want = int(0.5 * (15 * gib - 0.2 * gib) // 294_912) // 1024 * 1024
    assert gpu_batch_tokens(15 * gib, 0.2 * gib, 12, 768, 2) == want == 26624
    assert gpu_batch_tokens(1 * gib, 0.9 * gib, 12, 768, 2) == 4096  # little room: the bottom of the range
    assert gpu_batch_tokens(0, 5 * gib, 12, 768, 2) == 4096  # weights larger than the free memory
    assert gpu_batch_tokens(15 * gib, 0, 12, 768, 4) == 13312  # float32 takes twice the bytes: half the tokens
    assert gpu_batch_tokens(15 * gib, 0, 12, 768, 2, fraction=0.25, k=8) == 26624  # the knobs
    assert gpu_batch_tokens(10**15, 0, 1, 1, 1, hi=5000, multiple=1000) == 5000


def test_auto_budget_reads_free_memory_before_the_weights_load(monkeypatch):
    from types import SimpleNamespace

    from pipelines.model import backends
    from pipelines.model.scoring import max_batch_tokens

    bert = SimpleNamespace(
        num_hidden_layers=12, hidden_size=768, intermediate_size=3072, vocab_size=30522, max_position_embeddings=512
    )
    assert 100e6 < backends.estimate_parameters(bert) < 120e6  # BERT-base: 110M
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert backends.default_max_batch_tokens(cpu, bert, "bfloat16") == 2048  # CPU: today's default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.default_max_batch_tokens(cuda, bert, "bfloat16") == backends.GPU_BATCH_TOKENS_FALLBACK
    cfg = ModelConfig(name_or_path="m", max_batch_tokens="auto", dtype="bfloat16")
    assert max_batch_tokens(cfg, cuda, bert) == "auto"  # a driver without the workers' GPU: each worker decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (15 * gib, 16 * gib))
    weights = backends.estimate_parameters(bert) * 2
    want = backends.gpu_batch_tokens(15 * gib, weights, 12, 768, 2)
    assert backends.default_max_batch_tokens(cuda, bert, "bfloat16") == want
    assert max_batch_tokens(cfg, cuda, bert) == want
    assert max_batch_tokens(cfg.model_copy(update={"max_batch_tokens": 9000}), cuda, bert) == 9000  # a number wins
    assert backends.default_max_batch_tokens(cuda, bert, "float32") < want


def test_dtype_auto_on_cuda_is_bfloat16_where_supported(monkeypatch):
    from pipelines.model import backends

    cfg = ModelConfig(name_or_path="m", backend="auto", dtype="auto")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert backends.resolve_auto(cfg, cuda)[0].dtype == "bfloat16"
    assert backends.resolve_auto(cfg.model_copy(update={"backend": "torch"}), cuda)[0].dtype == "bfloat16"
    fixed = cfg.model_copy(update={"dtype": "float32"})
    assert backends.resolve_auto(fixed, cuda)[0].dtype == "float32"  # float32 only when asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4 or V100
    assert backends.resolve_auto(cfg, cuda)[0].dtype == "float16"


def test_one_device_to_host_copy_per_call(tiny_cross_encoder):
    """Micro-batch outputs stay where the backend computed them; score_encoded gathers them once."""
    import numpy as np

    from pipelines.model.scoring import Scorer
    from tests.datasets import make_pairs

    pairs = make_pairs(num_queries=4, per_query=10, seed=3)
    scorer = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96, max_batch_tokens=300))
    enc = scorer.encoder.encode(pairs["query"].tolist(), pairs["text"].tolist())
    real, gathers, outputs = scorer.backend.to_host, [], []
    real_forward = scorer.backend.forward_device

    def forward_device(ids, mask, types):
        out = real_forward(ids, mask, types)
        outputs.append(out)
        return out

    def to_host(parts):
        gathers.append(len(parts))
        return real(parts)

    scorer.backend.forward_device, scorer.backend.to_host = forward_device, to_host
    got = scorer.score_encoded(enc)
    assert len(gathers) == 1 and gathers[0] == len(outputs) > 3
    assert all(isinstance(o, torch.Tensor) for o in outputs)  # not copied to numpy one by one
    np.testing.assert_allclose(got, scorer.score(pairs["query"].tolist(), pairs["text"].tolist()), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_matches_cpu_float32(tiny_cross_encoder):
    import numpy as np

    from pipelines.model.scoring import Scorer
    from tests.datasets import make_pairs

    pairs = make_pairs(num_queries=4, per_query=10, seed=3)
    q, p = pairs["query"].tolist(), pairs["text"].tolist()
    gpu = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96, device="cuda"))
    assert gpu.config.dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    cpu = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96, device="cpu", dtype="float32"))
    ref = cpu.score(q, p)
    np.testing.assert_allclose(gpu.score_encoded(gpu.encoder.encode(q, p)), ref, atol=0.05 * (1 + np.abs(ref).max()))


# ---------------------------------------------------------------------------------------------- jobs/gpu_check.py

_NO_RAY_NO_PYDANTIC = """
import runpy, sys

class Block:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in ("pydantic", "pydantic_core", "ray"):
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
        return None

sys.meta_path.insert(0, Block)
sys.argv = ["jobs/gpu_check.py", "--device", "cpu", "--quick"]
try:
    runpy.run_path("jobs/gpu_check.py", run_name="__main__")
except SystemExit as end:
    assert not end.code, end.code
assert not {"pydantic", "ray"} & set(sys.modules)
print("NO-RAY-NO-PYDANTIC")
"""


@pytest.mark.timeout(600)
def test_gpu_check_smoke_run_without_ray_or_pydantic():
    """The GPU box has no Ray and no pydantic: the script's CPU smoke run, with both made unimportable, prints
    its tables."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-c", _NO_RAY_NO_PYDANTIC], cwd=root, capture_output=True, text=True, timeout=540, check=False
    )
    out = res.stdout
    assert res.returncode == 0, res.stderr[-3000:]
    assert "model settings: StandInConfig" in out and "NO-RAY-NO-PYDANTIC" in out
    assert "| model | max_batch_tokens | pairs/s | tokens/s | MFU | peak GPU GiB |" in out
    assert "max abs diff vs CPU float32" in out and "CPUs per GPU |" in out
    for model in ("mini", "base"):
        for budget in (1024, 4096):
            assert f"| {model} | {budget} | " in out


def test_gpu_check_stand_in_config_has_model_configs_fields_and_defaults():
    import dataclasses

    from jobs.gpu_check import StandInConfig
    from pipelines.config import ModelConfig

    stand_in = {f.name: f.default for f in dataclasses.fields(StandInConfig)}
    real = {k: (None if f.is_required() else f.default) for k, f in ModelConfig.model_fields.items()}
    assert stand_in.keys() == real.keys()
    assert {k: v for k, v in stand_in.items() if k != "name_or_path"} == {
        k: v for k, v in real.items() if k != "name_or_path"
    }
    cfg = StandInConfig(name_or_path="m")
    assert cfg.model_copy(update={"dtype": "bfloat16"}).dtype == "bfloat16" and cfg.dtype == "float32"


def test_gpu_check_peak_table():
    from jobs.gpu_check import peak_tflops

    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("Some Future GPU") is None


def test_a_gpu_runs_bfloat16_unless_float32_is_asked(monkeypatch):
    """model.dtype left at its default (float32, for CPUs) becomes bfloat16 on a GPU that has it (float16 on one
    that does not); float32 set explicitly stays; a CPU keeps float32."""
    import torch

    from pipelines.config import ModelConfig
    from pipelines.model import backends
    from pipelines.model.backends import selection

    cuda = torch.device("cuda")
    monkeypatch.setattr(selection, "cuda_bf16", lambda: True)
    resolved, choice = backends.resolve_auto(ModelConfig(name_or_path="m"), cuda)
    assert resolved.dtype == "bfloat16" and "GPU default" in choice["reason"]
    assert backends.resolve_auto(ModelConfig(name_or_path="m", dtype="float32"), cuda)[0].dtype == "float32"
    assert backends.resolve_auto(ModelConfig(name_or_path="m"), torch.device("cpu"))[0].dtype == "float32"
    monkeypatch.setattr(selection, "cuda_bf16", lambda: False)
    assert backends.resolve_auto(ModelConfig(name_or_path="m"), cuda)[0].dtype == "float16"
