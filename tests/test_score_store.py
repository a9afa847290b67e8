"""The score store (output.score_store): a rerun scores only the pairs it has not seen, and its output equals a
fresh full run; another model or setting reuses nothing; bad store files are named and skipped; concurrent
writers and retried units; S3 with request counts; compaction."""

from __future__ import annotations

import glob
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main as cli_main
from pipelines.io.score_store import ScoreStore, compact, hash_texts, namespaces
from pipelines.job import run_rerank
from tests.datasets import WORDS, read_output, small_job
from tests.ray_cluster import start_local_ray

pytestmark = pytest.mark.timeout(600)

TOP_N = 4


@pytest.fixture(scope="module")
def ray_s3(s3_server):
    """One local Ray for the module, started after the S3 server's environment is set (the S3 test needs it)."""
    import ray

    start_local_ray()
    yield s3_server
    ray.shutdown()


def make_input(num_queries: int = 16, per_query: int = 25, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(num_queries):
        query = " ".join(rng.choice(WORDS, 4))
        for d in range(per_query):
            rows.append(
                {
                    "query_id": q,
                    "query": query,
                    "doc_id": 1000 * q + d,
                    "text": " ".join(rng.choice(WORDS, int(rng.integers(3, 30)))) + f" d{d}",
                    "first_stage_rank": d + 1,
                }
            )
    return pd.DataFrame(rows)


def delta(df: pd.DataFrame, seed: int = 1) -> tuple[pd.DataFrame, int, int, int]:
    """2% of passages edited, 1% of candidates added, 1% removed: (new input, edited, added, removed)."""
    rng = np.random.default_rng(seed)
    n = len(df)
    edited, added, removed = max(1, n // 50), max(1, n // 100), max(1, n // 100)
    order = rng.permutation(n)
    out = df.copy()
    edit_rows = order[:edited]
    out.loc[out.index[edit_rows], "text"] = [f"{t} edited" for t in out["text"].iloc[edit_rows]]
    out = out.drop(out.index[order[edited : edited + removed]])
    extra = df.sample(added, random_state=seed).copy()
    extra["doc_id"] = extra["doc_id"] + 500
    extra["text"] = [f"new passage {i} about heat transfer" for i in range(added)]
    out = pd.concat([out, extra]).sort_values(["query_id", "first_stage_rank", "doc_id"], kind="mergesort")
    return out.reset_index(drop=True), edited, added, removed


def write(df: pd.DataFrame, folder: Path, files: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        part = df.iloc[i * len(df) // files : (i + 1) * len(df) // files]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / f"part-{i}.parquet")
    return folder


def job(tmp_path: Path, model: str, src: Path, out: str, store: str | None, **extra):
    extra.setdefault("scale__unit_rows", 100)
    config = small_job(tmp_path, model, src, TOP_N, output__uri=out, **extra)
    if store is not None:
        config = config.model_copy(update={"output": config.output.model_copy(update={"score_store": store})})
    return run_rerank(config)


def frame(out: str) -> pd.DataFrame:
    return read_output(Path(out))[["query_id", "doc_id", "rank", "score"]]


def test_delta_run_scores_only_changed_and_new_pairs(ray_s3, tmp_path, tiny_cross_encoder):
    df = make_input()
    store = str(tmp_path / "store")
    first = job(tmp_path, tiny_cross_encoder, write(df, tmp_path / "in1"), str(tmp_path / "o1"), store)
    assert (first.pairs_scored, first.pairs_reused, first.windows_scored) == (len(df), 0, len(df))
    assert first.score_store["pairs_written"] == len(df)
    assert "reused from the score store" in first.one_line()

    new, edited, added, _ = delta(df)
    src = write(new, tmp_path / "in2")
    again = job(tmp_path, tiny_cross_encoder, src, str(tmp_path / "o2"), store)
    # the model scored exactly the edited and added pairs (windows come from the model actors)
    assert again.windows_scored == again.pairs_scored == edited + added
    assert again.pairs_reused == len(new) - edited - added
    assert again.pairs_in == again.pairs_scored + again.pairs_reused + again.rejected
    fresh = job(tmp_path, tiny_cross_encoder, src, str(tmp_path / "o3"), None)
    assert fresh.pairs_scored == len(new)
    pd.testing.assert_frame_equal(frame(str(tmp_path / "o2")), frame(str(tmp_path / "o3")))
    assert not set(frame(str(tmp_path / "o2")).doc_id) & set(df.doc_id[~df.doc_id.isin(new.doc_id)])  # deleted

    nothing = job(tmp_path, tiny_cross_encoder, src, str(tmp_path / "o4"), store)
    assert (nothing.pairs_scored, nothing.windows_scored, nothing.pairs_reused) == (0, 0, len(new))
    pd.testing.assert_frame_equal(frame(str(tmp_path / "o4")), frame(str(tmp_path / "o3")))

    # another max_length, another model (its files differ): nothing reused, each its own namespace
    other = job(tmp_path, tiny_cross_encoder, src, str(tmp_path / "o5"), store, model__max_length=64)
    assert (other.pairs_scored, other.pairs_reused) == (len(new), 0)
    retrained = tmp_path / "model-v2"
    shutil.copytree(tiny_cross_encoder, retrained)
    weights = retrained / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # another revision of the weights: the folder's content identity changes
    weights.write_bytes(bytes(data))
    revised = job(tmp_path, str(retrained), src, str(tmp_path / "o6"), store)
    assert (revised.pairs_scored, revised.pairs_reused) == (len(new), 0)
    assert len({first.score_store["namespace"], other.score_store["namespace"], revised.score_store["namespace"]}) == 3
    assert len(namespaces(store)) == 3

    # compaction: fewer files, the same answers; then only one namespace kept
    ns = first.score_store["namespace"]
    before = glob.glob(f"{store}/v1/{ns}/*/*.parquet")
    report = compact(store)
    after = glob.glob(f"{store}/v1/{ns}/*/*.parquet")
    assert report.files_merged > 0 and len(after) < len(before)
    q, p = hash_texts(new["query"].tolist()), hash_texts(new["text"].tolist())
    scores, found, _ = ScoreStore(store, ns).lookup(q, p)
    assert found.all()
    # a run that reused every pair holds the stored scores bit for bit
    ref = frame(str(tmp_path / "o4")).merge(
        new[["query_id", "doc_id"]].assign(stored=scores), on=["query_id", "doc_id"]
    )
    assert (ref.score.to_numpy(np.float32) == ref.stored.to_numpy(np.float32)).all()
    assert cli_main(["store", "compact", store, "--keep-namespace", ns]) == 0
    assert namespaces(store) == [ns]


def test_corrupted_store_file_is_named_and_not_used(ray_s3, tmp_path, tiny_cross_encoder):
    df = make_input(num_queries=6, per_query=20, seed=4)
    store = str(tmp_path / "store")
    src = write(df, tmp_path / "in")
    first = job(tmp_path, tiny_cross_encoder, src, str(tmp_path / "o1"), store)
    files = sorted(glob.glob(f"{store}/v1/{first.score_store['namespace']}/*/*.parquet"))
    truncated, foreign = files[0], files[1]
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])
    # a file of another namespace put in this one's folder
    table = pq.read_table(foreign)
    from pipelines.io.score_store import file_bytes

    Path(foreign).write_bytes(file_bytes(table.set_column(2, "s", pa.array(np.zeros(len(table), np.float32))), "x"))
    lost = sum(pq.read_metadata(f).num_rows for f in (foreign,)) + _rows_of(data)
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pipelines.job.summary")
    logger.addHandler(handler)
    try:
        again = job(tmp_path, tiny_cross_encoder, src, str(tmp_path / "o2"), store)
    finally:
        logger.removeHandler(handler)
    lines = [line for line in seen if "score store file not used" in line]
    assert len(lines) == 2, lines
    assert any(truncated in line and "truncated" in line for line in lines)
    assert any(foreign in line and "namespace x" in line for line in lines)
    assert again.pairs_scored == lost and again.pairs_reused == len(df) - lost
    pd.testing.assert_frame_equal(frame(str(tmp_path / "o2")), frame(str(tmp_path / "o1")))


def _rows_of(data: bytes) -> int:
    return pq.read_metadata(pa.BufferReader(data)).num_rows


def test_two_jobs_at_once_and_a_retried_unit(ray_s3, tmp_path, tiny_cross_encoder):
    df = make_input(num_queries=10, per_query=20, seed=7)
    store = str(tmp_path / "store")
    src = write(df, tmp_path / "in")
    results, errors = {}, []

    def one(name: str) -> None:
        try:
            results[name] = job(tmp_path, tiny_cross_encoder, src, str(tmp_path / name), store)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    pd.testing.assert_frame_equal(frame(str(tmp_path / "a")), frame(str(tmp_path / "b")))
    ns = results["a"].score_store["namespace"]
    assert results["a"].score_store["namespace"] == results["b"].score_store["namespace"]
    rows = pa.concat_tables([pq.read_table(f) for f in glob.glob(f"{store}/v1/{ns}/*/*.parquet")]).to_pandas()
    rows["k"] = rows.q + rows.p
    assert rows.groupby("k").s.nunique().max() == 1  # each key once, or equal duplicates
    assert rows.k.nunique() == len(df)

    # a unit retried after its write rewrites the same file: nothing new, nothing lost
    store_obj = ScoreStore(store, ns)
    q, p = hash_texts(df["query"].tolist()[:20]), hash_texts(df["text"].tolist()[:20])
    scores, found, _ = store_obj.lookup(q, p)
    assert found.all()
    listed = sorted(glob.glob(f"{store}/v1/{ns}/*/*.parquet"))
    store_obj.write(q, p, scores)
    store_obj.write(q, p, scores)
    assert len(sorted(glob.glob(f"{store}/v1/{ns}/*/*.parquet"))) <= len(listed) + 1
    again = job(tmp_path, tiny_cross_encoder, src, str(tmp_path / "c"), store)
    assert again.pairs_scored == 0
    pd.testing.assert_frame_equal(frame(str(tmp_path / "c")), frame(str(tmp_path / "a")))


def test_store_on_s3_with_linear_requests(ray_s3, s3_fault_proxy, tmp_path, tiny_cross_encoder):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=ray_s3, key="testing", secret="testing", use_listings_cache=False)
    fs.mkdir("store-test")
    counts = {}
    for queries in (8, 16):
        df = make_input(num_queries=queries, per_query=20, seed=queries)
        store = f"s3://store-test/store-{queries}"
        src = write(df, tmp_path / f"in-{queries}")
        extra = {"storage__endpoint_url": s3_fault_proxy.endpoint}
        first = job(tmp_path, tiny_cross_encoder, src, str(tmp_path / f"o1-{queries}"), store, **extra)
        assert first.pairs_scored == len(df)
        new, edited, added, _ = delta(df, seed=queries)
        src2 = write(new, tmp_path / f"in2-{queries}")
        s3_fault_proxy.clear()
        again = job(tmp_path, tiny_cross_encoder, src2, str(tmp_path / f"o2-{queries}"), store, **extra)
        requests = sum(1 for s in s3_fault_proxy.seen if f"/store-{queries}" in s.path)
        assert again.pairs_scored == edited + added and again.pairs_reused == len(new) - edited - added
        job(tmp_path, tiny_cross_encoder, src2, str(tmp_path / f"o3-{queries}"), None)
        pd.testing.assert_frame_equal(frame(str(tmp_path / f"o2-{queries}")), frame(str(tmp_path / f"o3-{queries}")))
        # per query (its partition): a listing, a read of each file there, a write of its new scores
        assert requests <= 4 * queries + 2 * again.units + 4, (requests, queries, again.units)
        counts[queries] = requests
    assert counts[16] <= 2.5 * counts[8], counts
