"""Load on the online service beside the offline throughput of the same model.

    python jobs/benchmark_serve.py --clients 32 --requests 3 --docs 20

Starts `rerank serve` (a local Ray, 127.0.0.1, a free port) with a MiniLM-sized cross-encoder (or --model),
sends `--clients` concurrent clients x `--requests` requests of `--docs` Cranfield abstracts each to
/v2/rerank through the Cohere SDK, and prints latency percentiles and pairs/s beside the Scorer in this process on
the same pairs with the same model settings (`--set model.*`), in calls of 512 pairs after a warm-up call. The
offline figure is measured before the service starts and again after it stopped (never while it runs), so a load
that other processes put on the machine meanwhile shows as a gap between the two; the ratio is against their mean.
Beside wall-clock pairs/s it prints CPU seconds per pair (the service's process tree with the clients' process,
against the offline Scorer's process), which other processes' load on the cores changes much less, and the share
of the machine's busy CPU time that was not the benchmark's own. Figures, not asserts.

    python jobs/benchmark_serve.py --entry            # the same, the model served as a one-entry rerankers: list
    python jobs/benchmark_serve.py --cascade --clients 48 --docs 20 --keep 5

`--entry` serves the model through `rerankers:` (an ingress deployment calling the model's deployment through a
handle) instead of `model:` (one deployment), to price the extra hop. `--cascade` serves two copies of the model as
entries `first` and `second` (one CPU each) and a cascade `first-then-second` (keep `--keep`), and in the same
service run measures requests/s of the cascade against the same two calls made by each client (call `first`, keep
its top `--keep`, call `second` on those), alternating the two passes; no offline pass.
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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (0 for one that is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def descendants(pid: int) -> list[int]:
    """pid and every process below it (Linux /proc; empty elsewhere): rerank serve's local Ray, replicas included."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (not idle or waiting for I/O) since boot; 0 where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra serve config overrides")
    ap.add_argument("--entry", action="store_true", help="serve the model as a one-entry rerankers: list")
    ap.add_argument("--cascade", action="store_true", help="a cascade against the same two calls by the client")
    ap.add_argument("--keep", type=int, default=5, help="--cascade: the first stage's keep")
    ap.add_argument("--rounds", type=int, default=2, help="--cascade: passes of each kind, alternated")
    args = ap.parse_args()
    if args.cascade:
        return cascade_main(args)

    import cohere
    import numpy as np
    import torch
    import yaml

    from jobs.benchmark import minilm_cross_encoder
    from pipelines.config import ModelConfig
    from pipelines.io.collections import load_cranfield
    from pipelines.model import backends
    from pipelines.model.scoring import Scorer

    flags = " ".join(sorted(backends.cpu_flags() & set(backends.AUTO_FLAGS))) or "none"
    print(f"CPU {backends.cpu_name()}, {os.cpu_count()} cores, flags {flags}")
    print(f"load average at start (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="rerank-serve-bench-"))
    model = args.model or minilm_cross_encoder(work / "model")
    c = load_cranfield()
    docs = [t for t in c.corpus.values() if t.strip()]
    queries = list(c.queries.values())
    rng = np.random.default_rng(0)
    jobs = [
        (queries[int(rng.integers(len(queries)))], [docs[int(i)] for i in rng.integers(len(docs), size=args.docs)])
        for _ in range(args.clients * args.requests)
    ]
    qs = [q for q, d in jobs for _ in d]
    ps = [p for _, d in jobs for p in d]

    # The offline Scorer with the same model settings as the service (e.g. --set model.backend=auto --set
    # model.dtype=auto), so the ratio compares like with like; loaded (and warmed up) before the service starts.
    torch.set_num_threads(os.cpu_count() or 1)
    model_sets = dict(o.split("=", 1) for o in args.overrides if o.startswith("model."))
    extra = {k.removeprefix("model."): yaml.safe_load(v) for k, v in model_sets.items()}
    scorer = Scorer(ModelConfig(**{"name_or_path": model, "max_length": args.max_length, **extra}))
    scorer.score(qs[:64], ps[:64])

    def offline_pass() -> tuple[float, float]:
        """(pairs/s, CPU seconds per pair) of the Scorer in this process, calls of 512 pairs."""
        t, cpu = time.perf_counter(), self_cpu_seconds()
        for i in range(0, len(qs), 512):
            scorer.score(qs[i : i + 512], ps[i : i + 512])
        return len(qs) / (time.perf_counter() - t), (self_cpu_seconds() - cpu) / len(qs)

    offline = [offline_pass()]
    print(f"offline before the service: {offline[0][0]:.1f} pairs/s")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.entry:
        conf = entries_config(work, {"m": {"name_or_path": model, "max_length": args.max_length, **extra}}, 2)
        sets = [
            "--set",
            f"serve.port={port}",
            *[x for o in args.overrides if not o.startswith("model.") for x in ("--set", o)],
        ]
    else:
        conf = ROOT / "conf/serve.yaml"
        sets = ["--set", f"model.name_or_path={model}", "--set", f"model.max_length={args.max_length}",
                "--set", f"serve.port={port}", *[x for o in args.overrides for x in ("--set", o)]]  # fmt: skip
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", str(conf), *sets]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RERANK_API_KEY", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(url, proc)
        client = cohere.ClientV2(api_key="unused", base_url=url, timeout=600)

        def one(job):
            q, d = job
            t = time.perf_counter()
            client.rerank(model="m", query=q, documents=d)
            return time.perf_counter() - t

        client.rerank(model="m", query="warm up", documents=docs[:4])
        tree = descendants(proc.pid)
        busy, served, own = machine_busy_seconds(), cpu_seconds(tree), self_cpu_seconds()
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            latencies = sorted(pool.map(one, jobs))
        wall = time.perf_counter() - start
        served = cpu_seconds(tree) - served  # processes started meanwhile are not counted
        own = self_cpu_seconds() - own  # the clients (the offline Scorer is idle meanwhile)
        busy = machine_busy_seconds() - busy
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()

    pairs = len(jobs) * args.docs
    offline.append(offline_pass())
    pct = lambda p: latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]
    print(
        f"\n{args.clients} clients x {args.requests} requests x {args.docs} documents, model {model}"
        f"{' (one-entry rerankers:)' if args.entry else ''}, "
        f"max_length {args.max_length}, {os.cpu_count()} cores, backend {scorer.config.backend} {scorer.config.dtype}"
    )
    print(
        f"service: {len(jobs)} requests in {wall:.1f} s: {pairs / wall:.1f} pairs/s, {len(jobs) / wall:.2f} req/s; "
        f"latency p50 {pct(50):.2f} s, p95 {pct(95):.2f} s, p99 {pct(99):.2f} s, mean {statistics.mean(latencies):.2f} s"
    )
    rate = statistics.mean(r for r, _ in offline)
    per_pair = statistics.mean(c for _, c in offline)
    print(
        f"Scorer in one process on the same pairs: {offline[0][0]:.1f} pairs/s before the service, "
        f"{offline[1][0]:.1f} after; service/offline = {pairs / wall / rate:.2f} (against their mean {rate:.1f})"
    )
    if busy > 0:
        service_cpu = (served + own) / pairs
        print(
            f"CPU per pair: service {1000 * service_cpu:.1f} ms ({1000 * served / pairs:.1f} ms its processes, "
            f"{1000 * own / pairs:.1f} ms the clients), offline {1000 * per_pair:.1f} ms: offline/service = "
            f"{per_pair / service_cpu:.2f}; other processes used {max(0.0, busy - served - own) / busy:.0%} of the "
            f"machine's busy CPU time during the service pass ({busy / wall / (os.cpu_count() or 1):.0%} busy)"
        )
    print(f"load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def entries_config(work: Path, models: dict, cpus: float, cascade: dict | None = None) -> Path:
    """A rerankers: config (conf/serve.yaml's serve section, `cpus` per model replica) in work/."""
    import yaml

    base = yaml.safe_load((ROOT / "conf/serve.yaml").read_text())
    entries = [{"name": name, "model": {**base["model"], **m}} for name, m in models.items()]
    if cascade:
        entries.append(cascade)
    tree = {"rerankers": entries, "serve": {**base["serve"], "num_cpus_per_replica": cpus}}
    path = work / "serve_models.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def cascade_main(args: argparse.Namespace) -> None:
    """A cascade's requests/s against the same two calls made by the client, in one service run."""
    import cohere
    import numpy as np

    from jobs.benchmark import minilm_cross_encoder
    from pipelines.io.collections import load_cranfield
    from pipelines.model import backends

    flags = " ".join(sorted(backends.cpu_flags() & set(backends.AUTO_FLAGS))) or "none"
    print(f"CPU {backends.cpu_name()}, {os.cpu_count()} cores, flags {flags}")
    print(f"load average at start (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="rerank-serve-bench-"))
    model = args.model or minilm_cross_encoder(work / "model")
    c = load_cranfield()
    docs = [t for t in c.corpus.values() if t.strip()]
    queries = list(c.queries.values())
    rng = np.random.default_rng(0)
    jobs = [
        (queries[int(rng.integers(len(queries)))], [docs[int(i)] for i in rng.integers(len(docs), size=args.docs)])
        for _ in range(args.clients * args.requests)
    ]
    m = {"name_or_path": model, "max_length": args.max_length}
    cascade = {
        "name": "first-then-second",
        "cascade": [{"reranker": "first", "keep": args.keep}, {"reranker": "second"}],
    }
    conf = entries_config(work, {"first": m, "second": m}, 1, cascade)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", str(conf), "--set", f"serve.port={port}",
           *[x for o in args.overrides for x in ("--set", o)]]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RERANK_API_KEY", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = cohere.ClientV2(api_key="unused", base_url=url, timeout=600)

    def cascade_call(job):
        q, d = job
        t = time.perf_counter()
        res = client.rerank(model="first-then-second", query=q, documents=d)
        return time.perf_counter() - t, [r.index for r in res.results]

    def two_calls(job):
        q, d = job
        t = time.perf_counter()
        one = client.rerank(model="first", query=q, documents=d)
        kept = [r.index for r in one.results[: args.keep]]
        two = client.rerank(model="second", query=q, documents=[d[i] for i in kept])
        return time.perf_counter() - t, [kept[r.index] for r in two.results]

    def run(fn) -> tuple[float, list]:
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            out = list(pool.map(fn, jobs))
        return len(jobs) / (time.perf_counter() - start), out

    rates: dict[str, list[float]] = {"cascade": [], "client": []}
    latencies: dict[str, list[float]] = {"cascade": [], "client": []}
    try:
        wait_healthy(url, proc)
        cascade_call(jobs[0])
        two_calls(jobs[0])
        for _ in range(args.rounds):
            for kind, fn in (("cascade", cascade_call), ("client", two_calls)):
                rate, out = run(fn)
                rates[kind].append(rate)
                latencies[kind] += [t for t, _ in out]
                orders = [o for _, o in out]
                if kind == "cascade":
                    cascade_orders = orders
                else:
                    same = sum(a == b for a, b in zip(cascade_orders, orders))
                print(f"{kind}: {rate:.2f} req/s", flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    pct = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p / 100 * len(xs)))]
    print(
        f"\n{args.clients} clients x {args.requests} requests x {args.docs} documents, cascade keep {args.keep}, "
        f"two deployments of {model} (1 CPU each), max_length {args.max_length}, {os.cpu_count()} cores"
    )
    for kind, label in (("cascade", "cascade (one request)"), ("client", "the same two calls by the client")):
        r, lat = rates[kind], latencies[kind]
        print(
            f"{label}: {statistics.mean(r):.2f} req/s ({', '.join(f'{x:.2f}' for x in r)}), "
            f"{statistics.mean(r) * (args.docs + args.keep):.1f} pairs/s; latency p50 {pct(lat, 50):.2f} s, "
            f"p99 {pct(lat, 99):.2f} s"
        )
    print(f"cascade / two client calls = {statistics.mean(rates['cascade']) / statistics.mean(rates['client']):.2f} "
          f"(target >= 0.85); same final order in {same} of {len(jobs)} requests of the last round")  # fmt: skip
    print(f"load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
