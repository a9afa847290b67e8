"""The engine: the only layer that talks to Ray. ``ray_runtime`` (starting or joining Ray, signals, the cluster's
GPUs), ``ray_data`` (the one adapter from our stages to Ray Data), ``model_stage`` (the model actor), ``pool``
(the actor pool's size and resources), ``dataset_api`` (``rerank_dataset``, public as ``pipelines.dataset``)."""
