"""The model stage's actor pool on this cluster: its size, GPUs and CPUs per actor, decided from the config and
the cluster (what it has and, on an autoscaling cluster, what its node types can add); and the stage itself,
shared by the batch job and `pipelines.engine.dataset_api.rerank_dataset`."""

from __future__ import annotations

import math
from typing import Any

from pipelines.config import ModelConfig, ScaleConfig
from pipelines.engine.model_stage import ModelStage
from pipelines.engine.ray_data import ActorStage

#: CPUs each commit task reserves: it sorts a unit's scores and writes three small files.
COMMIT_CPUS = 0.25
#: Model actors at most when an autoscaler can add GPUs without a stated limit and scale.max_actors is unset.
UNBOUNDED_GPU_ACTORS = 64


def cluster_gpus() -> tuple[float, float]:
    """(GPUs up now, most GPUs the cluster can have): see pipelines.engine.ray_runtime.cluster_gpus."""
    from pipelines.engine import ray_runtime

    return ray_runtime.cluster_gpus()


def resolve_pool(model: ModelConfig, scale: ScaleConfig) -> dict[str, Any]:
    """The stages' settings for this model on this cluster (Ray must be running).

    GPUs per model actor (scale.num_gpus_per_actor auto): 1 when model.device is not cpu and the cluster has GPUs
    or can add GPU nodes; a job that wants GPUs waits for them (scale.actor_start_timeout_s), it never falls back
    to CPUs. Pool size: from scale.num_actors (auto: 1) to scale.max_actors (default: num_actors when it is a
    number, else one actor per GPU the cluster can have, or on CPUs one per num_cpus_per_actor of its CPUs less
    the CPU stages' share)."""
    import ray

    resources = ray.cluster_resources()
    gpus_now, gpus_max = cluster_gpus()
    gpus = scale.num_gpus_per_actor
    if gpus == "auto":
        wants_gpu = model.device == "auto" or model.device.startswith("cuda")
        gpus = 1.0 if wants_gpu and gpus_max > 0 else 0.0
    gpus = float(gpus)
    if gpus > 0:
        fits = UNBOUNDED_GPU_ACTORS if math.isinf(gpus_max) else max(1, int(gpus_max // gpus))
    elif scale.actor_resources:
        fits = max(1, int(min(resources.get(k, 0.0) / v for k, v in scale.actor_resources.items() if v > 0)))
    else:
        spare = resources.get("CPU", 1.0) - max(scale.prepare_cpus, 2.0)  # CPUs left to the CPU stages
        fits = max(1, int(spare // scale.num_cpus_per_actor))
    low = scale.num_actors if isinstance(scale.num_actors, int) else 1
    high = scale.max_actors or (scale.num_actors if isinstance(scale.num_actors, int) else fits)
    return {
        "min_actors": low,
        "max_actors": max(low, high),
        "num_gpus_per_actor": gpus,
        "num_cpus_per_actor": scale.num_cpus_per_actor,
        "actor_resources": dict(scale.actor_resources),
        "accelerator_type": scale.accelerator_type,
        "batches_in_flight": scale.batches_in_flight,
        "prepare_cpus": scale.prepare_cpus,
        "prepare_concurrency": scale.prepare_concurrency,
        "commit_cpus": COMMIT_CPUS,
        "unit_rows": scale.unit_rows,
        "cluster_gpus": {"now": gpus_now, "most": "unbounded" if math.isinf(gpus_max) else gpus_max},
    }


def model_stage(
    model: ModelConfig, scale: ScaleConfig, pool: dict[str, Any], isolate_errors: bool = True
) -> ActorStage:
    """The model stage (pipelines.engine.model_stage.ModelStage) as an actor pool with `pool`'s resources
    (resolve_pool). `isolate_errors`: a model error is isolated to the pairs that cause it (else it fails the
    stage at once)."""
    return ActorStage(
        "model",
        ModelStage,
        {
            "model": model,
            "num_cpus": pool["num_cpus_per_actor"],
            "in_flight": pool["batches_in_flight"],
            "batch_rows": scale.batch_rows,
            "isolate_errors": isolate_errors,
        },
        min_size=pool["min_actors"],
        max_size=pool["max_actors"],
        num_cpus=pool["num_cpus_per_actor"],
        num_gpus=pool["num_gpus_per_actor"],
        resources=pool["actor_resources"],
        accelerator_type=pool["accelerator_type"],
        in_flight=pool["batches_in_flight"],
        max_restarts=scale.max_restarts,
        # A lost actor's units wait for it to restart (Ray retries them on it, as often as it takes; a unit that
        # kills its actor each time is bounded by max_restarts); a pool with no actor left is the stall guard's.
        retries=-1,
    )
