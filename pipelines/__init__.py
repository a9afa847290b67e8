"""rerank: distributed batch reranking on Ray Data, an online service on Ray Serve, and the evaluation of what
reranking buys.

The public Python API (stable import paths):

- ``pipelines.dataset.rerank_dataset``: rerank a Ray Dataset you already have;
- ``pipelines.scoring.Scorer``: score (query, text) pairs in-process, no Ray;
- ``pipelines.config``: the typed configs (``RerankJobConfig``, ``ModelConfig``, ``ServeAppConfig``, ``EvalConfig``,
  ``load_config`` ...);
- ``pipelines.job.run_rerank``: run a batch job from a config on a running Ray.

The layers, imports pointing down only (``tests/test_layers.py`` checks it):

- apps: ``cli`` (the ``rerank`` command, the demo, ``rerank submit``), ``job``, ``serve``, ``evaluation``;
- ``engine``: everything that touches Ray (start-up, the Ray Data adapter, the model stage and its pool,
  ``rerank_dataset``);
- ``model`` (tokenising, scoring, backends) and ``io`` (storage, units, rows, the commit protocol and lease, test
  collections): free of Ray;
- ``config``, ``errors``.
"""
