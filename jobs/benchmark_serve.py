"""Load on the online service beside the offline throughput of the same model.

    python jobs/benchmark_serve.py --clients 32 --requests 3 --docs 20

Starts `rerank serve` (a local Ray, 127.0.0.1, a free port) with a MiniLM-sized cross-encoder (or --model),
sends `--clients` concurrent clients x `--requests` requests of `--docs` Cranfield abstracts each to
/v2/rerank through the Cohere SDK, and prints latency percentiles and pairs/s; then scores the same pairs with
the Scorer in one process for comparison. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"rerank serve exited early: {proc.stdout.read()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit("service not healthy in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra serve config overrides")
    args = ap.parse_args()

    import cohere
    import numpy as np

    from jobs.benchmark import minilm_cross_encoder
    from pipelines.evaluation.loaders import load_cranfield

    work = Path(tempfile.mkdtemp(prefix="rerank-serve-bench-"))
    model = args.model or minilm_cross_encoder(work / "model")
    c = load_cranfield()
    docs = [t for t in c.corpus.values() if t.strip()]
    queries = list(c.queries.values())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "pipelines.cli", "serve", str(ROOT / "conf/serve.yaml"),
        "--set", f"model.name_or_path={model}", "--set", f"model.max_length={args.max_length}",
        "--set", f"serve.port={port}", *[x for o in args.overrides for x in ("--set", o)],
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RERANK_API_KEY", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(url, proc)
        client = cohere.ClientV2(api_key="unused", base_url=url, timeout=600)
        rng = np.random.default_rng(0)
        jobs = [
            (queries[int(rng.integers(len(queries)))], [docs[int(i)] for i in rng.integers(len(docs), size=args.docs)])
            for _ in range(args.clients * args.requests)
        ]

        def one(job):
            q, d = job
            t = time.perf_counter()
            client.rerank(model="m", query=q, documents=d)
            return time.perf_counter() - t

        client.rerank(model="m", query="warm up", documents=docs[:4])
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            latencies = sorted(pool.map(one, jobs))
        wall = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()

    pairs = len(jobs) * args.docs
    pct = lambda p: latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]
    print(
        f"\n{args.clients} clients x {args.requests} requests x {args.docs} documents, model {model}, "
        f"max_length {args.max_length}, {os.cpu_count()} cores"
    )
    print(
        f"service: {len(jobs)} requests in {wall:.1f} s: {pairs / wall:.1f} pairs/s, {len(jobs) / wall:.2f} req/s; "
        f"latency p50 {pct(50):.2f} s, p95 {pct(95):.2f} s, p99 {pct(99):.2f} s, mean {statistics.mean(latencies):.2f} s"
    )

    import torch
    import yaml

    from pipelines.config import ModelConfig
    from pipelines.scoring import Scorer

    torch.set_num_threads(os.cpu_count() or 1)
    # The same model settings as the service (e.g. --set model.backend=auto --set model.dtype=auto), so the ratio
    # compares like with like.
    model_sets = dict(o.split("=", 1) for o in args.overrides if o.startswith("model."))
    extra = {k.removeprefix("model."): yaml.safe_load(v) for k, v in model_sets.items()}
    scorer = Scorer(ModelConfig(**{"name_or_path": model, "max_length": args.max_length, **extra}))
    qs = [q for q, d in jobs for _ in d]
    ps = [p for _, d in jobs for p in d]
    t = time.perf_counter()
    for i in range(0, len(qs), 512):
        scorer.score(qs[i : i + 512], ps[i : i + 512])
    offline = len(qs) / (time.perf_counter() - t)
    print(
        f"Scorer in one process on the same pairs: {offline:.1f} pairs/s; service/offline = {pairs / wall / offline:.2f}"
    )


if __name__ == "__main__":
    main()
