"""GPU sizing check of the model stage: how many pairs/s one GPU scores, and how many CPUs it takes to feed it.

    python jobs/gpu_check.py                         # CUDA, bfloat16, max_length 512 (about 2 minutes on an H200)
    python jobs/gpu_check.py --device cpu --quick    # a tiny smoke run (what tests/test_devices.py runs)

What it does, all offline (no hub, no download):
1. builds a BERT WordPiece tokenizer (30,522 entries at most, trained on the bundled Cranfield abstracts) and two
   cross-encoders with a random init and num_labels 1, saved with save_pretrained and loaded back through the
   same from_pretrained path users take: MiniLM-L6 size (6 layers, hidden 384, 12 heads, intermediate 1536) and
   BERT-base size (12 layers, hidden 768, 12 heads, intermediate 3072);
2. makes (query, passage) pairs from Cranfield (passages of one to three abstracts, so many reach max_length),
   encodes them once with the model's PairEncoder, and times only the model stage, Scorer.score_encoded, at a
   sweep of token budgets (model.max_batch_tokens; batch_size is raised so the budget is the limit);
3. checks the scores of a sample against float32 on the CPU (max abs diff);
4. measures the host side: PairEncoder.encode pairs/s on ONE CPU core (a child process pinned to one core,
   TOKENIZERS_PARALLELISM=false), and prints the implied sizing: pairs/s per GPU and CPUs per GPU to feed it.

Model FLOP utilisation = 2 x non-embedding parameters x real (unpadded) tokens / time / the GPU's dense bfloat16
peak (PEAK_TFLOPS, matched on the device name; n/a when unknown). The attention score FLOPs and the head-only last
layer (which skips most of the last layer's work) are not counted: it is the usual "model FLOPs" convention.

Dependencies: torch, transformers, tokenizers, numpy. No Ray and no pydantic: pipelines.model.encoding, scoring and
backends import pipelines.config only for type annotations, and this script gives the Scorer `StandInConfig`, a
plain dataclass with ModelConfig's fields and defaults (tests/test_devices.py checks they agree). Where pydantic
is installed the real, validated ModelConfig is used instead. Nothing is installed by the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CRANFIELD = ROOT / "pipelines" / "data" / "cranfield"

#: Dense bfloat16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),  # float16 (no bfloat16)
    ("T4", 65.0),  # float16 (no bfloat16)
)

FULL_MODELS = {
    "minilm-l6": {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
}
QUICK_MODELS = {
    "mini": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256},
    "base": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512},
}
VOCAB_SIZE = 30522


@dataclasses.dataclass
class StandInConfig:
    """ModelConfig's fields and defaults without pydantic (no validation: the values here are fixed and sane)."""

    name_or_path: str
    kind: str = "cross-encoder"
    revision: str | None = None
    max_length: int = 512
    max_query_length: int | None = None
    batch_size: int = 256
    max_batch_tokens: int | str = "auto"
    backend: str = "torch"
    dtype: str = "float32"
    cache_dir: str | None = None
    device: str = "auto"
    activation: str = "none"
    query_template: str = "{query}"
    passage_template: str = "{text}"
    prompt_template: str | None = None
    instruction: str | None = None
    yes_token: str = "yes"
    no_token: str | None = "no"
    long_text: str = "truncate"
    chunk_tokens: int | None = None
    chunk_stride: int | None = None
    chunk_aggregate: str = "max"
    max_windows: int = 64
    trust_remote_code: bool = False
    num_threads: int | None = None
    embedding_cache: int = 20000

    def model_copy(self, update: dict | None = None) -> StandInConfig:
        return dataclasses.replace(self, **(update or {}))


def model_config(**kw):
    try:
        from pipelines.config import ModelConfig
    except ImportError:  # no pydantic on this machine
        return StandInConfig(**kw)
    return ModelConfig(**kw)


# ---------------------------------------------------------------------------------------------- data and models


def _smart_texts(path: Path) -> list[str]:
    """The .W fields of a SMART file (Cranfield's cran.all.1400 / cran.qry), whitespace collapsed."""
    out = []
    for record in re.split(r"^\.I ", path.read_text(errors="replace"), flags=re.MULTILINE)[1:]:
        text = record.split("\n.W\n", 1)[1] if "\n.W\n" in record else ""
        text = " ".join(text.split())
        if text:
            out.append(text)
    return out


def make_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    import random

    abstracts = _smart_texts(CRANFIELD / "cran.all.1400")
    queries = _smart_texts(CRANFIELD / "cran.qry")
    rng = random.Random(seed)
    qs = [rng.choice(queries) for _ in range(n)]
    ps = [" ".join(rng.choice(abstracts) for _ in range(rng.randint(1, 3))) for _ in range(n)]
    return qs, ps


def build_tokenizer(folder: Path) -> None:
    """A lowercasing BERT WordPiece tokenizer trained on the Cranfield abstracts, saved as BertTokenizerFast."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    texts = _smart_texts(CRANFIELD / "cran.all.1400") + _smart_texts(CRANFIELD / "cran.qry")
    wp.train_from_iterator(texts, vocab_size=VOCAB_SIZE, min_frequency=1)
    wp.save_model(str(folder))
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=512).save_pretrained(
        folder
    )


def build_model(folder: Path, tokenizer_dir: Path, shape: dict, max_length: int, seed: int = 0) -> Path:
    """A BertForSequenceClassification(num_labels=1) of `shape`, random init, saved with its tokenizer."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    torch.manual_seed(seed)
    # initializer_range 0.1 (BERT's is 0.02): a random head then gives scores that differ (std of a few units), so
    # the bfloat16 / float32 difference is measured against a real spread, not near-constant scores.
    cfg = BertConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=max(512, max_length),
        num_labels=1,
        initializer_range=0.1,
        **shape,
    )
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS if k.lower() in name.lower()), None)


# ---------------------------------------------------------------------------------------------- host rate


def tokenize_rate(model_dir: str, max_length: int, n: int) -> float:
    """PairEncoder.encode pairs/s on one CPU core, measured in a child process pinned to one core."""
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--_tokenize-rate", model_dir, "--max-length", str(max_length), "--pairs", str(n)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"tokenisation child failed: {res.stderr[-2000:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["pairs_per_s"])


def _child_tokenize_rate(model_dir: str, max_length: int, n: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from pipelines.model.encoding import PairEncoder

    encoder = PairEncoder(model_config(name_or_path=model_dir, max_length=max_length))
    qs, ps = make_pairs(n, seed=1)
    encoder.encode(qs[:64], ps[:64])  # warm-up
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, n, 1024):  # the size of a CPU stage's batch
            encoder.encode(qs[i : i + 1024], ps[i : i + 1024])
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"pairs_per_s": n / best}))


# ---------------------------------------------------------------------------------------------- the check


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from pipelines.model import backends
    from pipelines.model.scoring import Scorer

    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: use --device cpu")
    shapes = QUICK_MODELS if args.quick else FULL_MODELS
    budgets = [int(x) for x in args.budgets.split(",")]
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else backends.cpu_name()
    peak = peak_tflops(gpu_name) if device.type == "cuda" else None
    settings = type(model_config(name_or_path="probe")).__name__
    print(
        f"device: {gpu_name} ({device}); dtype {dtype}; max_length {args.max_length}; {args.pairs} pairs; "
        f"model settings: {settings}",
        flush=True,
    )

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    build_tokenizer(work / "tokenizer")
    qs, ps = make_pairs(args.pairs)
    rows, accuracy, sizing = [], {}, {}
    for name, shape in shapes.items():
        path = str(build_model(work / name, work / "tokenizer", shape, args.max_length))
        cfg = model_config(
            name_or_path=path,
            max_length=args.max_length,
            device=str(device),
            dtype=dtype,
            backend="torch",
            batch_size=args.batch_size,
            max_batch_tokens=budgets[0],
        )
        auto = None
        if device.type == "cuda":
            from transformers import AutoConfig

            auto = backends.default_max_batch_tokens(device, AutoConfig.from_pretrained(path), dtype)
        scorer = Scorer(cfg)
        params = non_embedding_params(scorer.backend.model)
        enc = scorer.encoder.encode(qs, ps)
        tokens = int(enc.offsets[-1])
        warm = scorer.encoder.encode(qs[:256], ps[:256])
        print(
            f"{name}: {params / 1e6:.1f}M non-embedding parameters; {tokens / len(qs):.0f} tokens per pair; "
            f"max_batch_tokens auto here: {auto if auto is not None else 'n/a (CPU: 2048)'}",
            flush=True,
        )
        for budget in budgets:
            if time.perf_counter() - started > args.time_limit_s:
                print(f"time limit reached: budgets from {budget} skipped", flush=True)
                break
            scorer.max_batch_tokens = budget
            scorer.score_encoded(warm)
            for k in scorer.stats:
                scorer.stats[k] = 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            best = math.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                scorer.score_encoded(enc)  # ends with the one device-to-host copy: synchronised
                best = min(best, time.perf_counter() - t0)
            st = scorer.stats
            flops = 2.0 * params * tokens
            rows.append(
                {
                    "model": name,
                    "budget": budget,
                    "pairs_per_s": len(qs) / best,
                    "tokens_per_s": tokens / best,
                    "mfu": (flops / best / (peak * 1e12)) if peak else None,
                    "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
                    "padding": 1 - st["tokens"] / max(1, st["padded_tokens"]),
                    "passes": st["forward_passes"] // args.repeats,
                    "oom_splits": st["oom_splits"],
                }
            )
            print(_row(rows[-1]), flush=True)
        # Accuracy: this device and dtype against float32 on the CPU, on a sample.
        sample = min(args.sample, len(qs))
        ref_scorer = Scorer(cfg.model_copy(update={"device": "cpu", "dtype": "float32", "max_batch_tokens": 4096}))
        ref = ref_scorer.score_encoded(ref_scorer.encoder.encode(qs[:sample], ps[:sample]))
        got = scorer.score_encoded(scorer.encoder.encode(qs[:sample], ps[:sample]))
        diff = float(np.abs(got - ref).max())
        accuracy[name] = {"max_abs_diff": diff, "ref_std": float(np.std(ref)), "pairs": sample}
        del scorer, ref_scorer
        if device.type == "cuda":
            torch.cuda.empty_cache()

    host = tokenize_rate(str(work / next(iter(shapes))), args.max_length, args.host_pairs)
    for name in shapes:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        top = max(mine, key=lambda r: r["pairs_per_s"])
        sizing[name] = {
            "best_budget": top["budget"],
            "pairs_per_s_per_gpu": top["pairs_per_s"],
            "host_pairs_per_s_per_core": host,
            "cpus_per_gpu": math.ceil(top["pairs_per_s"] / host),
        }
    result = {
        "device": gpu_name,
        "dtype": dtype,
        "max_length": args.max_length,
        "pairs": len(qs),
        "peak_tflops": peak,
        "rows": rows,
        "accuracy": accuracy,
        "sizing": sizing,
        "elapsed_s": time.perf_counter() - started,
    }
    _print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


HEADER = "| model | max_batch_tokens | pairs/s | tokens/s | MFU | peak GPU GiB | padding | passes | OOM splits |"


def _row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
    return (
        f"| {r['model']} | {r['budget']} | {r['pairs_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} | "
        f"{100 * r['padding']:.1f}% | {r['passes']} | {r['oom_splits']} |"
    )


def _print_report(res: dict) -> None:
    peak = f"{res['peak_tflops']:.0f} TFLOP/s dense bf16" if res["peak_tflops"] else "unknown (MFU n/a)"
    print(f"\n## Model stage on {res['device']} ({res['dtype']}, max_length {res['max_length']}; peak {peak})\n")
    print(HEADER)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(_row(r))
    print("\n| model | pairs | max abs diff vs CPU float32 | std of the reference scores |")
    print("|---|---:|---:|---:|")
    for name, a in res["accuracy"].items():
        print(f"| {name} | {a['pairs']} | {a['max_abs_diff']:.4g} | {a['ref_std']:.4g} |")
    print("\n| model | best max_batch_tokens | pairs/s per GPU | host encode pairs/s per CPU core | CPUs per GPU |")
    print("|---|---:|---:|---:|---:|")
    for name, s in res["sizing"].items():
        print(
            f"| {name} | {s['best_budget']} | {s['pairs_per_s_per_gpu']:,.0f} | "
            f"{s['host_pairs_per_s_per_core']:,.0f} | {s['cpus_per_gpu']} |"
        )
    print(f"\nelapsed {res['elapsed_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny models and few pairs: a smoke run")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--max-length", type=int, default=None, help="default 512 (quick: 128)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs timed per budget (default 8192; quick: 64)")
    ap.add_argument("--budgets", default=None, help="comma-separated max_batch_tokens (default 8k..128k)")
    ap.add_argument("--batch-size", type=int, default=8192, help="model.batch_size: high, so the budget is the cap")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per budget, best kept (default 3; quick 1)")
    ap.add_argument("--sample", type=int, default=None, help="pairs checked against CPU float32 (default 64)")
    ap.add_argument("--host-pairs", type=int, default=None, help="pairs for the one-core encode rate (2048)")
    ap.add_argument("--time-limit-s", type=float, default=360.0, help="skip the remaining budgets after this")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--_tokenize-rate", dest="tokenize_rate", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.quick
    args.max_length = args.max_length or (128 if quick else 512)
    args.pairs = args.pairs or (64 if quick else 8192)
    args.budgets = args.budgets or ("1024,4096" if quick else "8192,16384,32768,65536,131072")
    args.repeats = args.repeats or (1 if quick else 3)
    args.sample = args.sample or (16 if quick else 64)
    args.host_pairs = args.host_pairs or (128 if quick else 2048)
    if args.tokenize_rate:
        _child_tokenize_rate(args.tokenize_rate, args.max_length, args.pairs)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
