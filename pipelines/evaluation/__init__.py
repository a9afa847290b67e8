"""`rerank eval`: what a reranker buys on a test collection, as N_Base, K and N_Reranked.

Modules: ``first_stage`` (BM25, dense, run files),
``metrics`` (ir_measures), ``costs`` (LLM context tokens and money), ``cascade`` (cascade entries of
``rerankers:``: their rankings, pairs per stage and compute), ``sweep`` (the run), ``report`` (files); the
collections' readers (TREC, BEIR, JSONL/Parquet, SMART, the bundled Cranfield) are ``pipelines.io.collections``.

For the demo and notebooks::

    from pipelines.evaluation import load_cranfield, retrieve
    coll = load_cranfield()
    run = retrieve(coll.corpus, coll.queries, k=100)   # BM25: query id -> [(doc id, score), ...]
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.io.collections import Collection, load_cranfield, load_smart_collection

__all__ = [
    "Collection",
    "bm25_retrieve",
    "load_cranfield",
    "load_smart_collection",
    "register_cli",
    "retrieve",
    "run_eval",
]


def __getattr__(name: str) -> Any:
    # numpy/bm25s/torch load only when a first stage or the sweep is actually used.
    if name in ("retrieve", "bm25_retrieve", "dense_retrieve"):
        from pipelines.evaluation import first_stage

        return getattr(first_stage, name)
    if name == "run_eval":
        from pipelines.evaluation.sweep import run_eval

        return run_eval
    raise AttributeError(name)


def _cmd_eval(args: argparse.Namespace) -> int:
    import ray

    from pipelines.config import EvalConfig, load_config
    from pipelines.engine.ray_runtime import connect, joins_cluster, shutdown, stop_on_signals
    from pipelines.evaluation.cascade import spec_models
    from pipelines.evaluation.sweep import run_eval
    from pipelines.model.backends import check_model_config

    config = load_config(EvalConfig, args.config, args.overrides)
    for spec in config.reranker_specs:  # an unsupported backend/dtype is refused before Ray starts
        for model in spec_models(spec, config.reranker_specs):  # a cascade's stages' models too
            check_model_config(model, joins_cluster())
    with stop_on_signals():  # SIGTERM stops it as Ctrl-C does (exit 143), not with Ray's stack dump
        joined = not ray.is_initialized()
        try:
            connect(config.ray)
            result = run_eval(config)
        finally:
            if joined:
                shutdown()
    print(result.markdown)
    print(f"report: {result.report_dir}/report.json, report.md, quality_vs_tokens.png, runs/")
    return 0


def register_cli(commands: dict, add_config_args) -> None:
    def eval_args(p: argparse.ArgumentParser) -> None:
        add_config_args(p)

    commands["eval"] = (
        "measure what reranking buys on a test collection: quality and LLM context cost for N_Base, K, N_Reranked",
        eval_args,
        _cmd_eval,
    )
