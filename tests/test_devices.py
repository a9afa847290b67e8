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
