"""Costs that must grow with the data, not its square: S3 requests of a job over thousands of small files
(counted by the proxy in front of moto), a resume that reads no footer again, and the driver's memory from
10,000 to 1,000,000 pairs."""

from __future__ import annotations

import collections
import io
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from pipelines.io.rows import layout_to_json
from pipelines.io.units import plan_units
from pipelines.job import hold_output, plan_rerank, run_rerank
from tests.datasets import WORDS, small_job
from tests.ray_cluster import start_local_ray

BUCKET = "scale"
FILES, PER_FILE = 2000, 50


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    import ray

    start_local_ray()
    yield s3_server
    ray.shutdown()


def pairs_table(n: int, seed: int, first_query: int) -> pa.Table:
    rng = random.Random(seed)
    rows = [
        {
            "query_id": first_query + i // 10,
            "query": " ".join(rng.choices(WORDS, k=3)),
            "doc_id": i,
            "text": " ".join(rng.choices(WORDS, k=4)),
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows)


def count(seen, *, method: str | None = None, contains: str = "") -> int:
    return sum(1 for s in seen if (method is None or s.method == method) and contains in s.path)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_s3_requests_grow_with_files_units_and_buckets(s3_ray, s3_fault_proxy, tmp_path, tiny_cross_encoder):
    fs = s3fs.S3FileSystem(endpoint_url=s3_ray, key="testing", secret="testing", use_listings_cache=False)
    fs.mkdir(BUCKET)

    def put(i: int) -> None:
        buf = io.BytesIO()
        pq.write_table(pairs_table(PER_FILE, i, first_query=5 * i), buf)
        fs.pipe(f"{BUCKET}/in/part-{i:05d}.parquet", buf.getvalue())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(FILES)))
    proxy = s3_fault_proxy
    config = small_job(
        tmp_path,
        tiny_cross_encoder,
        f"s3://{BUCKET}/in/",
        3,
        output__uri=f"s3://{BUCKET}/out",
        storage__endpoint_url=proxy.endpoint,
        model__max_length=32,
        scale__batch_rows=4096,
    )

    proxy.clear()
    plan = plan_rerank(config)
    plan_requests = len(proxy.seen)
    footer_reads = count(proxy.seen, method="GET", contains=f"/{BUCKET}/in/part-")
    assert footer_reads == FILES  # one ranged read of each file's tail
    assert plan_requests <= 2 * FILES, collections.Counter(s.method for s in proxy.seen)

    # What an interrupted run leaves: the manifest with its units planned, no unit done. A resume re-reads no
    # footer: the listing's ETags show the files unchanged, and the layout is the manifest's.
    lease = hold_output(plan)
    units, _ = plan_units(plan.footers, plan.layout, config.scale.unit_rows)
    plan.progress.write_manifest(
        {
            "version": 2,
            "fingerprint": plan.fingerprint,
            "layout": layout_to_json(plan.layout),
            "join_partitions": 2,
            "units": [u.to_list() for u in units],
        }
    )
    lease.release()
    resume = config.model_copy(update={"output": config.output.model_copy(update={"mode": "resume"})})
    proxy.clear()
    resumed = plan_rerank(resume)
    assert resumed.footers is None
    assert count(proxy.seen, method="GET", contains=f"/{BUCKET}/in/part-") == 0, proxy.seen[:5]

    proxy.clear()
    started = time.monotonic()
    summary = run_rerank(resume, resumed)
    elapsed = time.monotonic() - started
    job_requests = len(proxy.seen)
    assert summary.pairs_scored == FILES * PER_FILE and summary.units == len(units) < FILES  # small files combined
    buckets = summary.scale["reduce_buckets"]
    # Per unit: its file opened and read (HEAD + GET), its partial and done record written (2 PUTs), its partial
    # read by the merge (1 ranged GET); the driver has the commit records from the actors. Per group and bucket a
    # few more; listings are paged. Measured: 5.0 per unit (main: about 12 per file, half of them the reduce's).
    c = 4
    bound = c * (FILES + summary.units + buckets)
    by_kind = collections.Counter(f"{s.method} {'/in/' if '/in/' in s.path else 'out'}" for s in proxy.seen)
    print(
        f"\nS3 requests: plan {plan_requests} ({plan_requests / FILES:.2f} per file), job {job_requests} "
        f"({job_requests / summary.units:.2f} per unit) in {elapsed:.0f} s; by kind {dict(by_kind)}"
    )
    assert job_requests <= bound, (job_requests, bound, dict(by_kind))
    out = pd.concat(
        [pq.read_table(io.BytesIO(fs.cat_file(p))).to_pandas() for p in fs.glob(f"{BUCKET}/out/part-*.parquet")]
    )
    assert out["query_id"].nunique() == FILES * PER_FILE // 10 and (out.groupby("query_id").size() == 3).all()


# ---------------------------------------------------------------------------- driver memory


def write_input(folder: Path, n: int, files: int) -> Path:
    folder.mkdir(parents=True)
    per = n // files
    for i in range(files):
        pq.write_table(pairs_table(per, i, first_query=i * per // 10), folder / f"p{i}.parquet", row_group_size=5000)
    return folder


def driver_peak_rss(config: Path, env: dict[str, str]) -> tuple[int, str]:
    """Runs `rerank run` and samples the driver process's own RSS (not Ray's processes) until it exits."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    me = psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                peak = max(peak, me.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate(timeout=1200)
    watcher.join()
    assert proc.returncode == 0, err[-3000:]
    return peak, out


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_driver_memory_is_flat_from_10k_to_1m_pairs(tmp_path, tiny_cross_encoder):
    import tempfile

    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rm-", dir="/tmp")
    peaks = {}
    for n, files in ((10_000, 2), (1_000_000, 20)):
        src = write_input(tmp_path / f"in-{n}", n, files)
        config = tmp_path / f"job-{n}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "input": {"uri": str(src)},
                    "output": {"uri": str(tmp_path / f"out-{n}"), "top_n": 3},
                    "model": {"name_or_path": tiny_cross_encoder, "max_length": 32, "batch_size": 256},
                    "scale": {"num_actors": 1, "num_cpus_per_actor": 1, "unit_rows": 2000, "batch_rows": 4096},
                    "ray": {"num_cpus": 3},
                }
            )
        )
        peaks[n], line = driver_peak_rss(config, env)
        print(f"\n{n:,} pairs: driver peak RSS {peaks[n] / 2**20:.0f} MiB; {line.strip()}")
    assert peaks[1_000_000] < 1.2 * peaks[10_000], peaks
