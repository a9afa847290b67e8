"""Synthetic candidate sets for tests, and an independent (pandas) reference of the job's output."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import RerankJobConfig, validate_config

WORDS = (  # noqa: SIM905
    "flow boundary layer pressure heat transfer wing supersonic mach number shock wave the of a"
).split()


def make_pairs(num_queries: int = 12, per_query: int = 9, seed: int = 0, str_query_ids: bool = False) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for q in range(num_queries):
        query = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
        n = per_query - (q % 4)  # some queries have fewer candidates than others
        for d in range(n):
            rows.append(
                {
                    "query_id": f"q{q}" if str_query_ids else q,
                    "query": query,
                    "doc_id": 1000 * q + d,
                    "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 40))),
                    "first_stage_rank": d + 1,
                    "first_stage_score": float(100 - d),
                }
            )
    return pd.DataFrame(rows)


def write_flat(df: pd.DataFrame, folder: Path, files: int = 3, seed: int = 1) -> Path:
    """Rows shuffled and dealt over several files, so a query's rows are spread out."""
    folder.mkdir(parents=True, exist_ok=True)
    shuffled = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    for i in range(files):
        part = shuffled.iloc[i::files]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / f"part-{i}.parquet")
    return folder


def write_packed(df: pd.DataFrame, folder: Path, files: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    queries = []
    for (qid, query), group in df.groupby(["query_id", "query"], sort=False):
        cands = group.drop(columns=["query_id", "query"]).to_dict("records")
        queries.append({"query_id": qid, "query": query, "candidates": cands})
    for i in range(files):
        pq.write_table(pa.Table.from_pylist(queries[i::files]), folder / f"part-{i}.parquet")
    return folder


def reference_top_n(df: pd.DataFrame, scores, n: int) -> pd.DataFrame:
    """The expected output, computed without any of the job's code beyond the scores."""
    ref = df.assign(score=pd.Series(scores, index=df.index).astype("float32"))
    ref = ref.sort_values(
        ["query_id", "score", "first_stage_rank", "doc_id"], ascending=[True, False, True, True], kind="mergesort"
    )
    ref = ref.groupby("query_id", sort=False).head(n).copy()
    ref["rank"] = ref.groupby("query_id").cumcount() + 1
    return ref[["query_id", "doc_id", "rank", "score", "first_stage_rank"]].reset_index(drop=True)


def read_output(folder: Path) -> pd.DataFrame:
    import pyarrow.dataset as pds

    table = pds.dataset(str(folder), format="parquet").to_table()
    return table.to_pandas().sort_values(["query_id", "rank"]).reset_index(drop=True)


def small_job(tmp_path: Path, model: str, input_uri, top_n: int, **extra) -> RerankJobConfig:
    """A job config sized for a 2-core test machine: two half-CPU actors, small batches, output in tmp_path/out.
    ``extra`` sets or overrides fields as ``section__name=value`` (e.g. ``scale__unit_rows=6``)."""
    data = {
        "input": {"uri": str(input_uri)},
        "output": {"uri": str(tmp_path / "out"), "top_n": top_n},
        "model": {"name_or_path": model, "max_length": 96, "batch_size": 8},
        "scale": {"num_actors": 2, "num_cpus_per_actor": 0.5, "batch_rows": 16},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return validate_config(RerankJobConfig, data)
