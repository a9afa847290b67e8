"""Public import path of the in-process scorer: ``from pipelines.scoring import Scorer``.

The code lives in :mod:`pipelines.model.scoring`."""

from pipelines.model.scoring import ModelInfo, Scorer, describe_model

__all__ = ["ModelInfo", "Scorer", "describe_model"]
