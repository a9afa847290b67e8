"""GPU sizing check of the model stage: how many pairs/s one GPU scores, and how many CPUs it takes to feed it.

    python jobs/gpu_check.py                         # CUDA, bfloat16, max_length 512 (about 4 minutes on an H100)
    python jobs/gpu_check.py --models llama-1b-bidir # the seed's model only (about 2 minutes)
    python jobs/gpu_check.py --device cpu --quick    # a tiny smoke run (what tests/test_devices.py runs)

What it does, all offline (no hub, no download):
1. builds a BERT WordPiece tokenizer (30,522 entries at most, trained on the bundled Cranfield abstracts) and two
   cross-encoders with a random init and num_labels 1, saved with save_pretrained and loaded back through the
   same from_pretrained path users take: MiniLM-L6 size (6 layers, hidden 384, 12 heads, intermediate 1536) and
   BERT-base size (12 layers, hidden 768, 12 heads, intermediate 3072);
2. the seed's model, NVIDIA's llama-nemotron-rerank-1b-v2, at its real shape with a random init
   (`llama-1b-bidir`: Llama-3.2-1B, 16 layers, hidden 2048, 32 heads, 8 KV heads, intermediate 8192, vocabulary
   128,256): a remote-code model (trust_remote_code, an auto_map in its config.json) whose code this script writes
   into the model folder, from the public description of the architecture: Llama decoder layers with
   bidirectional attention (a mask that hides padding only), the last hidden state mean-pooled over real tokens,
   a one-logit linear head. Its pairs are ONE string, "question:{query} \\n \\n passage:{text}", tokenized as the
   model card does (one begin-of-text token in front, truncation at max_length), with a real Llama-3 tokenizer
   when one is in the local Hugging Face cache (or --llama-tokenizer), else a Llama-3-like one built here: a
   byte-level BPE with Llama-3's pre-tokenizer pattern and specials, trained on Cranfield (about 14k entries
   instead of 128k: a similar cost per token, not the same token counts; the report says which was used). It
   is measured first and briefly (--llama-pairs, --llama-budgets, --llama-repeats);
3. makes (query, passage) pairs from Cranfield (passages of one to three abstracts, so many reach max_length),
   encodes them once (the BERT models with their PairEncoder, the Llama model with the one-string prompt), and
   times only the model stage, Scorer.score_encoded, at a sweep of token budgets (model.max_batch_tokens;
   batch_size is raised so the budget is the limit);
4. checks the scores of a sample against float32 on the CPU (max abs diff);
5. measures the host side on ONE CPU core (a child process pinned to one core, TOKENIZERS_PARALLELISM=false):
   PairEncoder.encode pairs/s for the BERT models, the one-string prompt's encoding for the Llama model; and
   prints the implied sizing: pairs/s per GPU and CPUs per GPU to feed it.

Model FLOP utilisation = 2 x non-embedding parameters x real (unpadded) tokens / time / the GPU's dense bfloat16
peak (PEAK_TFLOPS, matched on the device name; n/a when unknown). The attention score FLOPs and the head-only last
layer (which skips most of the last layer's work) are not counted: it is the usual "model FLOPs" convention.

A model that fails to build or load is reported in one line and the others are still measured.

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

#: The seed's model, llama-nemotron-rerank-1b-v2: Llama-3.2-1B's shape (head_dim 64), bidirectional attention.
LLAMA_FULL = {
    "llama-1b-bidir": {
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
    }
}
#: The same code at a tiny size (the CPU smoke run), with the real vocabulary size.
LLAMA_QUICK = {
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "vocab_size": 128256,
    }
}
#: NVIDIA's one-string prompt for its llama-nemotron rerankers (model card; real newlines).
PROMPT = "question:{query} \n \n passage:{text}"
#: Where a real Llama-3 tokenizer may already be in the local Hugging Face cache (looked up offline only).
LLAMA_TOKENIZERS = (
    "nvidia/llama-nemotron-rerank-1b-v2",
    "nvidia/llama-3.2-nv-rerankqa-1b-v2",
    "meta-llama/Llama-3.2-1B",
)
#: Llama-3's pre-tokenizer pattern (the split before byte-level BPE), as published with its tokenizer.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


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
    padding_side: str = "auto"
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


#: The remote code of the Llama reranker, written into the model folder (loaded with trust_remote_code).
BIDIRECTIONAL_LLAMA = '''"""A Llama reranker with bidirectional attention, written for jobs/gpu_check.py from the public description of
NVIDIA's llama-nemotron-rerank models: Llama decoder layers in which every real token attends to every real token
(no causal mask), the last hidden state mean-pooled over the real tokens, and a one-logit linear head."""

import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class LlamaBidirectionalModel(LlamaModel):
    """LlamaModel given a 4D additive mask that hides padded keys only (transformers passes a 4D mask through)."""

    def __init__(self, config):
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n, length = attention_mask.shape
        dtype = self.embed_tokens.weight.dtype
        bias = torch.zeros((n, 1, 1, length), dtype=dtype, device=attention_mask.device)
        bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(dtype).min)
        return super().forward(input_ids=input_ids, attention_mask=bias.expand(n, 1, length, length), **kwargs)


class LlamaBidirectionalForSequenceClassification(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaBidirectionalModel(config)
        self.score = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return SequenceClassifierOutput(logits=self.score(pooled))
'''


def build_llama_tokenizer(folder: Path, name: str | None = None) -> str:
    """The Llama model's tokenizer in `folder`; returns what it is. A real Llama-3 tokenizer when `name` (a path or
    hub id) or one of LLAMA_TOKENIZERS loads offline (local files only); else a Llama-3-like one built here: byte-
    level BPE with Llama-3's pre-tokenizer pattern, trained on Cranfield, <|begin_of_text|> in front of a single
    text (and, as Llama-3's pair template does, in front of the second text of a pair), no pad token, left padding."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    for candidate in [name] if name else LLAMA_TOKENIZERS:
        try:
            tok = AutoTokenizer.from_pretrained(candidate, local_files_only=True)
        except Exception:
            if name:
                raise
            continue
        tok.save_pretrained(folder)
        return f"{candidate} (a real Llama-3 tokenizer, {len(tok):,} entries)"
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=128000,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_smart_texts(CRANFIELD / "cran.all.1400") + _smart_texts(CRANFIELD / "cran.qry"), trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        padding_side="left",
        model_max_length=8192,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.save_pretrained(folder)
    return (
        f"Llama-3-like, built here (byte-level BPE with Llama-3's pre-tokenizer pattern trained on Cranfield, "
        f"{len(tok):,} entries instead of 128,256: a similar cost per token, not Llama-3's token counts)"
    )


def build_llama(folder: Path, tokenizer_dir: Path, shape: dict, max_length: int, device, seed: int = 0) -> Path:
    """The bidirectional Llama reranker of `shape` (num_labels 1, random init), saved with its remote code (an
    auto_map in config.json) and tokenizer. Initialised on `device` (a GPU makes the 1B init fast) and saved in
    bfloat16 there (half the bytes to write and read; the CPU reference loads it back as float32)."""
    import importlib.util
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    source = folder.parent / "remote-code" / "modeling_llama_bidirectional.py"  # save_pretrained copies it
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(BIDIRECTIONAL_LLAMA)
    spec = importlib.util.spec_from_file_location("modeling_llama_bidirectional", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_llama_bidirectional"] = module
    spec.loader.exec_module(module)
    cls = module.LlamaBidirectionalForSequenceClassification
    cls.register_for_auto_class("AutoModelForSequenceClassification")
    if len(tok) > shape["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {len(tok)} entries, more than the model's vocabulary {shape['vocab_size']}"
        )
    cfg = LlamaConfig(
        **shape,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        max_position_embeddings=max(8192, max_length),
        num_labels=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg).eval()
    if torch.device(device).type == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return folder


def prompt_encoder(model_dir: str, max_length: int):
    """(encode(queries, passages) -> Encoded, how) for the one-string PROMPT: the project's PairEncoder when this
    version of it tokenizes PROMPT for a cross-encoder exactly as the model card does, else the model card's
    recipe itself, tokenizer(PROMPT.format(...), truncation=True, max_length=L), packed as PairEncoder packs."""
    from transformers import AutoTokenizer

    from pipelines.model.encoding import Encoded, PairEncoder

    tok = AutoTokenizer.from_pretrained(model_dir)

    def recipe(queries, passages):
        prompts = [PROMPT.format(query=q, text=t) for q, t in zip(queries, passages)]
        ids = tok(prompts, truncation=True, max_length=max_length)["input_ids"]
        return Encoded.pack(ids, None, range(len(ids)), len(ids))

    try:
        cfg = model_config(
            name_or_path=model_dir, max_length=max_length, trust_remote_code=True, prompt_template=PROMPT
        )
        encoder = PairEncoder(cfg)
        qs, ps = make_pairs(8, seed=3)
        ps = [p[:300] for p in ps]  # pairs that fit: where the recipe and the project's rule must agree
        if encoder.encode(qs, ps).input_ids == recipe(qs, ps).input_ids:
            return encoder.encode, "PairEncoder with model.prompt_template (the project's one-string path)"
        why = "its ids differ from the recipe's"
    except Exception as err:  # noqa: BLE001 - no one-string prompt for cross-encoders in this version
        why = _one_line(err)
    return recipe, f"the model card's recipe (this PairEncoder's one-string prompt is not used: {why})"


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n and "embed_tokens" not in n)


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS if k.lower() in name.lower()), None)


# ---------------------------------------------------------------------------------------------- host rate


def tokenize_rate(model_dir: str, max_length: int, n: int, prompt: bool = False) -> float:
    """Encoding pairs/s on one CPU core, measured in a child process pinned to one core: PairEncoder.encode, or with
    `prompt` the one-string PROMPT (prompt_encoder)."""
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--_tokenize-rate", model_dir, "--max-length", str(max_length), "--pairs", str(n)]
    res = subprocess.run(
        cmd + (["--_prompt"] if prompt else []), env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"tokenisation child failed: {res.stderr[-2000:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["pairs_per_s"])


def _child_tokenize_rate(model_dir: str, max_length: int, n: int, prompt: bool = False) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from pipelines.model.encoding import PairEncoder

    if prompt:
        encode = prompt_encoder(model_dir, max_length)[0]
    else:
        encode = PairEncoder(model_config(name_or_path=model_dir, max_length=max_length)).encode
    qs, ps = make_pairs(n, seed=1)
    encode(qs[:64], ps[:64])  # warm-up
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, n, 1024):  # the size of a CPU stage's batch
            encode(qs[i : i + 1024], ps[i : i + 1024])
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"pairs_per_s": n / best}))


# ---------------------------------------------------------------------------------------------- the check


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _sweep(name, scorer, enc, budgets, repeats, ctx) -> None:
    """Time scorer.score_encoded(enc) at each token budget (best of `repeats`), rows appended to ctx["rows"]. After
    the time limit a model's remaining budgets are skipped, but every model gets its first."""
    import torch

    device, params, tokens, n_pairs = ctx["device"], ctx["params"], int(enc.offsets[-1]), enc.n_pairs
    for i, budget in enumerate(budgets):
        if i and time.perf_counter() - ctx["started"] > ctx["time_limit_s"]:
            print(f"{name}: time limit reached: budgets from {budget} skipped", flush=True)
            break
        scorer.max_batch_tokens = budget
        scorer.score_encoded(ctx["warm"])
        for k in scorer.stats:
            scorer.stats[k] = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            scorer.score_encoded(enc)  # ends with the one device-to-host copy: synchronised
            best = min(best, time.perf_counter() - t0)
        st = scorer.stats
        peak = ctx["peak"]
        ctx["rows"].append(
            {
                "model": name,
                "budget": budget,
                "pairs_per_s": n_pairs / best,
                "tokens_per_s": tokens / best,
                "mfu": (2.0 * params * tokens / best / (peak * 1e12)) if peak else None,
                "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
                "padding": 1 - st["tokens"] / max(1, st["padded_tokens"]),
                "passes": st["forward_passes"] // repeats,
                "oom_splits": st["oom_splits"],
            }
        )
        print(_row(ctx["rows"][-1]), flush=True)


def _measure(name, cfg, encode, qs, ps, budgets, repeats, sample, ctx) -> None:
    """Load `cfg` with the Scorer, encode the pairs with `encode(scorer, queries, passages)`, sweep the budgets,
    and compare a sample with float32 on the CPU (ctx["accuracy"])."""
    import numpy as np
    import torch

    from pipelines.model import backends
    from pipelines.model.scoring import Scorer

    device = ctx["device"]
    auto = None
    if device.type == "cuda":
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        auto = backends.default_max_batch_tokens(device, hf, cfg.dtype)
    scorer = Scorer(cfg)
    ctx["params"] = non_embedding_params(scorer.backend.model)
    enc = encode(scorer, qs, ps)
    ctx["warm"] = encode(scorer, qs[:256], ps[:256])
    print(
        f"{name}: {ctx['params'] / 1e6:.1f}M non-embedding parameters; {int(enc.offsets[-1]) / len(qs):.0f} tokens "
        f"per pair; max_batch_tokens auto here: {auto if auto is not None else 'n/a (CPU: 2048)'}",
        flush=True,
    )
    _sweep(name, scorer, enc, budgets, repeats, ctx)
    # Accuracy: this device and dtype against float32 on the CPU, on a sample.
    sample = min(sample, len(qs))
    got = scorer.score_encoded(encode(scorer, qs[:sample], ps[:sample]))
    del scorer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ref_scorer = Scorer(cfg.model_copy(update={"device": "cpu", "dtype": "float32", "max_batch_tokens": 4096}))
    ref = ref_scorer.score_encoded(encode(ref_scorer, qs[:sample], ps[:sample]))
    del ref_scorer
    ctx["accuracy"][name] = {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "ref_std": float(np.std(ref)),
        "pairs": sample,
    }


def _selected(args: argparse.Namespace) -> tuple[dict, dict]:
    """(Llama models, BERT models) to run: all of the size, or those named by --models."""
    llama, bert = (LLAMA_QUICK, QUICK_MODELS) if args.quick else (LLAMA_FULL, FULL_MODELS)
    if not args.models:
        return llama, bert
    names = [x.strip() for x in args.models.split(",") if x.strip()]
    unknown = [x for x in names if x not in llama and x not in bert]
    if unknown:
        raise SystemExit(f"unknown --models {', '.join(unknown)}; choose from {', '.join([*llama, *bert])}")
    return {k: v for k, v in llama.items() if k in names}, {k: v for k, v in bert.items() if k in names}


def run(args: argparse.Namespace) -> dict:
    import torch

    from pipelines.model import backends

    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: use --device cpu")
    llamas, shapes = _selected(args)
    budgets = [int(x) for x in args.budgets.split(",")]
    llama_budgets = [int(x) for x in args.llama_budgets.split(",")]
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else backends.cpu_name()
    peak = peak_tflops(gpu_name) if device.type == "cuda" else None
    settings = type(model_config(name_or_path="probe")).__name__
    print(
        f"device: {gpu_name} ({device}); dtype {dtype}; max_length {args.max_length}; {args.pairs} pairs "
        f"({args.llama_pairs} for the Llama model); model settings: {settings}",
        flush=True,
    )

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        return _run_in(args, work, device, dtype, gpu_name, peak, started, llamas, shapes, budgets, llama_budgets)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # the 1B model's weights alone are 2.5 GB


def _run_in(args, work, device, dtype, gpu_name, peak, started, llamas, shapes, budgets, llama_budgets) -> dict:
    import torch

    ctx = {
        "device": device,
        "peak": peak,
        "started": started,
        "time_limit_s": args.time_limit_s,
        "rows": [],
        "accuracy": {},
    }
    sizing, host, notes, failed = {}, {}, [], {}
    common = {"max_length": args.max_length, "device": str(device), "dtype": dtype, "backend": "torch"}

    # The seed's model first: the measurement this check exists for, kept short.
    for name, shape in llamas.items():
        try:
            how_tok = build_llama_tokenizer(work / "llama-tokenizer", args.llama_tokenizer)
            path = str(build_llama(work / name, work / "llama-tokenizer", shape, args.max_length, device))
            prompt_encode, how_enc = prompt_encoder(path, args.max_length)
            qs, ps = make_pairs(args.llama_pairs)
            cfg = model_config(
                name_or_path=path,
                trust_remote_code=True,
                batch_size=args.batch_size,
                max_batch_tokens=llama_budgets[0],
                **common,
            )
            _measure(
                name,
                cfg,
                lambda _scorer, q, p, encode=prompt_encode: encode(q, p),
                qs,
                ps,
                llama_budgets,
                args.llama_repeats,
                min(args.sample, 8),
                ctx,
            )
            notes.append(
                f"{name}: remote code (LlamaBidirectionalForSequenceClassification, written by this script); pairs "
                f"are one string {PROMPT!r}, encoded by {how_enc}; tokenizer: {how_tok}"
            )
            host[name] = tokenize_rate(path, args.max_length, args.host_pairs, prompt=True)
        except Exception as err:  # noqa: BLE001 - one line, and the other models are still measured
            failed[name] = _one_line(err)
            print(f"{name}: not (fully) measured: {failed[name]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if shapes:
        build_tokenizer(work / "tokenizer")
        qs, ps = make_pairs(args.pairs)
    for name, shape in shapes.items():
        path = str(build_model(work / name, work / "tokenizer", shape, args.max_length))
        cfg = model_config(name_or_path=path, batch_size=args.batch_size, max_batch_tokens=budgets[0], **common)
        _measure(
            name,
            cfg,
            lambda scorer, q, p: scorer.encoder.encode(q, p),
            qs,
            ps,
            budgets,
            args.repeats,
            args.sample,
            ctx,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if shapes:
        rate = tokenize_rate(str(work / next(iter(shapes))), args.max_length, args.host_pairs)
        host.update({name: rate for name in shapes})
        notes.append(f"{', '.join(shapes)}: PairEncoder (query, passage) pairs with the Cranfield WordPiece tokenizer")

    for name in [*llamas, *shapes]:
        mine = [r for r in ctx["rows"] if r["model"] == name]
        if not mine or name not in host:
            continue
        top = max(mine, key=lambda r: r["pairs_per_s"])
        sizing[name] = {
            "best_budget": top["budget"],
            "pairs_per_s_per_gpu": top["pairs_per_s"],
            "host_pairs_per_s_per_core": host[name],
            "cpus_per_gpu": math.ceil(top["pairs_per_s"] / host[name]),
        }
    result = {
        "device": gpu_name,
        "dtype": dtype,
        "max_length": args.max_length,
        "pairs": args.pairs,
        "llama_pairs": args.llama_pairs,
        "peak_tflops": peak,
        "rows": ctx["rows"],
        "accuracy": ctx["accuracy"],
        "sizing": sizing,
        "notes": notes,
        "failed": failed,
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
    for note in res.get("notes", []):
        print(f"- {note}")
    for name, why in res.get("failed", {}).items():
        print(f"- {name}: not (fully) measured: {why}")
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
    ap.add_argument(
        "--models",
        default=None,
        help="comma-separated subset: llama-1b-bidir, minilm-l6, bert-base (quick: llama, mini, base); default all",
    )
    ap.add_argument("--llama-pairs", type=int, default=None, help="pairs timed for the Llama model (2048; quick 32)")
    ap.add_argument("--llama-budgets", default=None, help="its max_batch_tokens (default 16k,32k,64k; quick 1024)")
    ap.add_argument("--llama-repeats", type=int, default=None, help="its timed runs per budget (default 2; quick 1)")
    ap.add_argument(
        "--llama-tokenizer", default=None, help="a Llama-3 tokenizer folder or cached hub id (offline; default: look)"
    )
    ap.add_argument("--_tokenize-rate", dest="tokenize_rate", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_prompt", dest="prompt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.quick
    args.max_length = args.max_length or (128 if quick else 512)
    args.pairs = args.pairs or (64 if quick else 8192)
    args.budgets = args.budgets or ("1024,4096" if quick else "8192,16384,32768,65536,131072")
    args.repeats = args.repeats or (1 if quick else 3)
    args.sample = args.sample or (16 if quick else 64)
    args.host_pairs = args.host_pairs or (128 if quick else 2048)
    args.llama_pairs = args.llama_pairs or (32 if quick else 2048)
    args.llama_budgets = args.llama_budgets or ("1024" if quick else "16384,32768,65536")
    args.llama_repeats = args.llama_repeats or (1 if quick else 2)
    if args.tokenize_rate:
        _child_tokenize_rate(args.tokenize_rate, args.max_length, args.pairs, args.prompt)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
