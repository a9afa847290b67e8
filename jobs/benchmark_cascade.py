"""What a cascade costs in the batch job, against its two models run on their own: figures, not asserts.

    python jobs/benchmark_cascade.py --queries 100 --k 100 --keep 20 --max-length 128

On Cranfield BM25 top-K candidates (the bundled collection), with a MiniLM-L6-size cross-encoder (the real
all-MiniLM-L6-v2 weights under a fresh 1-logit head) as the first stage and a BERT-base-size cross-encoder (12
layers, hidden 768, seeded random weights, the same tokenizer) as the second, each a `rerank run` job on the
local Ray this script starts (1 actor per stage, the machine's cores):

- `small`: the small model alone over the K candidates per query (top_n = keep);
- `big on kept`: the big model alone over what `small` kept (its input written from small's output);
- `cascade`: the cascade job (small over K, keep, big over the kept, top_n 10);
- `big alone`: the big model alone over the K candidates (with --big-alone-pairs, over that many of them, its
  time scaled to all K by its measured pairs/s: say so when quoting).

Prints each job's wall time (plan to publish, actor start included) and the two ratios the cascade issue asks
for: cascade / (small + big on kept) (the machinery's cost) and cascade / big alone (what the cascade saves).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def bert_base_cross_encoder(folder: Path, tokenizer_from: str) -> str:
    """A BERT-base-size cross-encoder (12 layers, hidden 768, 12 heads, 3072 intermediate), seeded random
    weights, saved with the small model's tokenizer (BERT uncased vocabulary)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=100, help="Cranfield queries (225 at most)")
    ap.add_argument("--k", type=int, default=100, help="first-stage candidates per query (K)")
    ap.add_argument("--keep", type=int, default=20, help="the small model's keep (M)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--big-alone-pairs", type=int, default=0, help="big alone over this many pairs (0: all of K)")
    ap.add_argument("--out", default="benchmark_cascade.json")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    from benchmark import _cpu_model, minilm_cross_encoder

    from pipelines.cli.demo import write_cranfield_candidates
    from pipelines.config import RerankJobConfig, validate_config
    from pipelines.job import run_rerank

    work = Path(tempfile.mkdtemp(prefix="bench-cascade-"))
    small = minilm_cross_encoder(work / "model-small")
    big = bert_base_cross_encoder(work / "model-big", small)
    write_cranfield_candidates(work / "all", k=args.k, shards=1)
    table = pq.read_table(work / "all")
    qids = sorted(set(table.column("query_id").to_pylist()))[: args.queries]
    table = table.filter(pa.compute.is_in(table.column("query_id"), pa.array(qids)))
    (work / "in").mkdir()
    for i in range(4):  # a query's candidates over several files, as a first-stage dump has them
        pq.write_table(table.take(list(range(i, table.num_rows, 4))), work / "in" / f"part-{i}.parquet")
    pairs = table.num_rows
    model = {"max_length": args.max_length}
    scale = {"num_actors": 1, "unit_rows": 2000}

    def job(name: str, src: Path, top_n: int, **section) -> dict:
        data = {
            "input": {"uri": str(src)},
            "output": {"uri": str(work / name), "top_n": top_n, "mode": "overwrite"},
            "scale": scale,
        } | section
        started = time.perf_counter()
        summary = run_rerank(validate_config(RerankJobConfig, data))
        wall = time.perf_counter() - started
        print(f"  {name:<12} {summary.pairs_scored:>7,} pairs {wall:8.1f} s  {summary.one_line()}", flush=True)
        return {"wall_s": wall, "pairs": summary.pairs_scored, "summary": summary.to_dict()}

    from pipelines.engine.ray_runtime import connect, shutdown

    connect()  # a local Ray as `rerank run` starts it (more logical CPUs than cores, loopback)
    print(f"CPU: {_cpu_model()}; {pairs:,} pairs ({len(qids)} queries x K={args.k}), keep {args.keep}", flush=True)
    rows: dict[str, dict] = {}
    top = min(10, args.keep)  # the output's top_n: the big model's top 10 (or all it was given)
    rows["small"] = job("small", work / "in", args.keep, model={"name_or_path": small} | model)
    kept = pq.read_table(work / "small", columns=["query_id", "doc_id"])
    big_in = table.join(kept, ["query_id", "doc_id"], join_type="inner")
    (work / "big_in").mkdir()
    pq.write_table(big_in, work / "big_in" / "part-0.parquet")
    rows["big on kept"] = job("big_kept", work / "big_in", top, model={"name_or_path": big} | model)
    stages = [
        {"name": "small", "model": {"name_or_path": small} | model, "keep": args.keep},
        {"name": "big", "model": {"name_or_path": big} | model},
    ]
    rows["cascade"] = job("cascade", work / "in", top, cascade=stages)
    src = work / "in"
    if args.big_alone_pairs:
        (work / "big_all_in").mkdir()
        pq.write_table(table.slice(0, args.big_alone_pairs), work / "big_all_in" / "part-0.parquet")
        src = work / "big_all_in"
    rows["big alone"] = job("big_all", src, top, model={"name_or_path": big} | model)
    if args.big_alone_pairs:
        measured = rows["big alone"]
        rate = measured["summary"]["pairs_per_s"]
        rows["big alone"] = measured | {
            "measured_on": measured["pairs"],
            "wall_s": measured["wall_s"] * pairs / measured["pairs"],
        }
        print(f"  big alone scaled to {pairs:,} pairs at its {rate:.1f} pairs/s: {rows['big alone']['wall_s']:.1f} s")
    shutdown()

    two = rows["small"]["wall_s"] + rows["big on kept"]["wall_s"]
    ratios = {
        "cascade / (small + big on kept)": rows["cascade"]["wall_s"] / two,
        "cascade / big alone": rows["cascade"]["wall_s"] / rows["big alone"]["wall_s"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    Path(args.out).write_text(
        json.dumps({"cpu": _cpu_model(), "pairs": pairs, "rows": rows, "ratios": ratios}, indent=1)
    )


if __name__ == "__main__":
    main()
