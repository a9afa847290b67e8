"""The one place that turns our stages into Ray Data calls (as NeMo Curator's adapters do).

A stage is a plain callable on a ``pyarrow.Table`` batch (``pipelines.engine.model_stage``, ``pipelines.job.stages``): a
function runs as Ray Data *tasks* (any CPU of the cluster, as many at once as its resources allow), a class as an
*actor pool* (one model copy per actor, ``min_size`` to ``max_size`` actors that Ray Data grows as work queues and
the cluster has room, each holding ``in_flight`` batches so it never waits for the next one). What each stage
reserves (CPUs, GPUs, custom resources) and how failures are retried is written here, once.

Library code never starts Ray: these calls expect it to be running.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import RerankError

#: What a task stage retries besides its worker dying: storage errors (s3fs and pyarrow raise OSError).
RETRIED_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class TaskStage:
    """A function stage: Ray Data tasks of `num_cpus` each, at most `concurrency` at once (None: as the cluster's
    CPUs allow). `batch_size` rows per call (None: a whole block)."""

    name: str
    fn: Callable[..., Any]
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    num_cpus: float = 1.0
    concurrency: int | None = None
    batch_size: int | None = 1
    retries: int = 3
    memory: float | None = None


@dataclass(frozen=True)
class ActorStage:
    """A class stage: an actor pool of `min_size`..`max_size` actors, each reserving `num_cpus` / `num_gpus`
    (fractions allowed) and `resources`, optionally on `accelerator_type` nodes, with `in_flight` batches queued
    per actor. A dead actor is restarted up to `max_restarts` times and its batches retried up to `retries`."""

    name: str
    cls: type
    constructor_kwargs: dict[str, Any] = field(default_factory=dict)
    min_size: int = 1
    max_size: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    in_flight: int = 2
    batch_size: int | None = 1
    max_restarts: int = 3
    retries: int = 3


def apply(ds: Any, stage: TaskStage | ActorStage) -> Any:
    """`ds.map_batches` for one stage, with its resources and fault settings."""
    with warnings.catch_warnings():  # max_retries & co have no named parameter yet (Ray 2.60)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        return _map_batches(ds, stage)


def _map_batches(ds: Any, stage: TaskStage | ActorStage) -> Any:
    import ray.data

    common = {"batch_format": "pyarrow", "batch_size": stage.batch_size, "zero_copy_batch": True}
    if isinstance(stage, TaskStage):
        extra = {"memory": stage.memory} if stage.memory else {}
        return ds.map_batches(
            stage.fn,
            fn_kwargs=stage.fn_kwargs,
            num_cpus=stage.num_cpus,
            compute=ray.data.TaskPoolStrategy(size=stage.concurrency) if stage.concurrency else None,
            max_retries=stage.retries,
            retry_exceptions=list(RETRIED_ERRORS),
            **common,
            **extra,
        )
    extra: dict[str, Any] = {}
    if stage.resources:
        extra["resources"] = dict(stage.resources)
    if stage.accelerator_type:
        extra["accelerator_type"] = stage.accelerator_type
    return ds.map_batches(
        stage.cls,
        fn_constructor_kwargs=stage.constructor_kwargs,
        compute=ray.data.ActorPoolStrategy(
            min_size=stage.min_size,
            max_size=max(stage.min_size, stage.max_size),
            max_tasks_in_flight_per_actor=max(1, stage.in_flight),
        ),
        num_cpus=stage.num_cpus,
        num_gpus=stage.num_gpus or None,
        max_restarts=stage.max_restarts,
        max_task_retries=stage.retries,
        **common,
        **extra,
    )


@contextlib.contextmanager
def data_context(**settings: Any) -> Iterator[Any]:
    """Ray Data settings for the datasets built inside (the current DataContext, restored on exit)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    try:
        yield ctx
    finally:
        for k, v in before.items():
            setattr(ctx, k, v)


def root_cause(err: BaseException) -> str:
    """The last 'SomethingError: message' line of a Ray error (the user code's own error), else its first line."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception): ", ln)]
    line = lines[-1] if lines else (text.strip().splitlines() or [type(err).__name__])[0]
    return line[:500]


def rerank_error(err: BaseException) -> RerankError | None:
    """Our own error (bad input, a refused config, an accounting failure) raised inside a Ray task or actor, found
    through Ray's and Ray Data's wrappers (``RayTaskError.cause``, exception chaining): the original, whose message
    is one line; None when the failure is not ours."""
    from ray.exceptions import RayError

    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RerankError) and not isinstance(e, RayError):
            return _without_ray_notes(e)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return _from_text(err)


_OURS = re.compile(r"^(pipelines\.[\w.]+)\.(\w+): (.+)$", re.MULTILINE)


def _from_text(err: BaseException) -> RerankError | None:
    """Our error where Ray kept only its text (an actor's UDF error reaches the driver as a traceback string): the
    last ``pipelines.<module>.<SomeError>: message`` line, rebuilt as that class when it is one of ours."""
    import importlib

    for module, name, message in reversed(_OURS.findall(str(err))):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, RerankError):
            return cls(message.strip())
    return None


def _without_ray_notes(err: RerankError) -> RerankError:
    """Ray Data appends its retry advice to a UDF's error message ("Failed to apply UDF transform after ..."):
    ours are one line and say what to do, so it is cut off."""
    text = str(err)
    cut = text.find("\nFailed to apply UDF")
    if cut < 0:
        return err
    clean = type(err)(text[:cut].rstrip())
    clean.__cause__ = err.__cause__
    return clean
