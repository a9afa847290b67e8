"""Public import path of the Ray Data API: ``from pipelines.dataset import rerank_dataset``.

The code lives in :mod:`pipelines.engine.dataset_api`."""

from pipelines.engine.dataset_api import rerank_dataset

__all__ = ["rerank_dataset"]
