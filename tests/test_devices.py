"""model.device against what an actor or replica sees: Ray numbers the GPUs it reserved from cuda:0."""

from __future__ import annotations

import pytest
import torch

from pipelines.backends import actor_device
from pipelines.config import ModelConfig
from pipelines.errors import ConfigError


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

    from pipelines.scoring import Scorer
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
