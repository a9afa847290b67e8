"""The model: one Scorer for the batch job, the service and the evaluation, so their scores agree.

No Ray here. A Scorer loads a model once (through a backend of pipelines.backends: torch, ONNX Runtime or
OpenVINO; causal-lm rerankers through torch here) and turns (query, passage) pairs into float32 scores.
Three steps, kept apart:

1. encode (``_encode``): each pair becomes one or more units of input_ids (a pair truncated, or, with
   ``long_text: chunks``, one unit per window of a long passage) plus a unit -> pair index;
2. forward (``_run``): the units are cut into blocks; each block is sorted by token length and cut into
   micro-batches filled up to a token budget (padded tokens counted), handed to the model as int32 arrays, one
   block ahead of the model on a background thread, then put back in unit order;
3. reduce (``_reduce``): the units of a pair become one row of logits (max / first / mean of its windows), and
   ``from_logits`` turns a row into a score.

Truncation of a pair (cross-encoders and causal-lm prompts): nothing is cut when the whole pair fits in
max_length. When it does not, the passage is cut first; the query is cut only as far as needed to leave the
passage ``budget - max_query_length`` tokens (budget = max_length less the special or template tokens), or all
of the passage when it is shorter. So the query keeps max(max_query_length, budget - passage) tokens.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import string
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import backends
from pipelines.config import ModelConfig
from pipelines.errors import ConfigError

log = logging.getLogger(__name__)

#: Most pairs tokenised per step of the pipeline: the background thread tokenises block k+1 while the model runs
#: block k. Pairs are sorted by length within a block, so larger blocks pad less and overlap later.
BLOCK_ROWS = 1024
MIN_BLOCK_ROWS = 256


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {device!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return dev


@dataclass(frozen=True)
class ModelInfo:
    """What the summary and the service report about the model actually loaded."""

    name_or_path: str
    kind: str
    revision: str
    num_labels: int | None
    device: str
    dtype: str
    backend: str = "torch"
    max_batch_tokens: int = 0
    #: What model.backend / model.dtype auto chose and why (backends.resolve_auto); None when neither was auto.
    backend_choice: dict | None = None


def model_fingerprint(name_or_path: str, revision: str | None) -> str:
    """A pinned revision, or the hub commit of the cached snapshot, or a hash of a local folder's files."""
    if revision:
        return revision
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(p)).encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
        return "sha256:" + h.hexdigest()[:16]
    # A hub id: the commit the local cache resolved "main" to, which is what from_pretrained loads.
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        ref = Path(HF_HUB_CACHE) / ("models--" + name_or_path.replace("/", "--")) / "refs" / "main"
        if ref.is_file():
            return ref.read_text().strip()
    except ImportError:
        pass
    return "main (unresolved)"


def load_tokenizer_and_labels(config: ModelConfig):
    """Load the tokenizer and check the model config without loading weights: cheap enough for a driver to
    validate a job's model before any cluster time is spent. Returns (tokenizer, num_labels or None)."""
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name_or_path, **kwargs)
        hf_config = AutoConfig.from_pretrained(config.name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load model {config.name_or_path!r}: {str(err).strip().splitlines()[0]} "
            "(check model.name_or_path, access to the Hugging Face hub, or HF_HUB_OFFLINE and the local cache)"
        ) from None
    if config.kind == "bi-encoder":
        return tokenizer, None
    if config.kind == "causal-lm":
        label_token_ids(tokenizer, config)
        return tokenizer, 1
    num_labels = getattr(hf_config, "num_labels", 1)
    if num_labels not in (1, 2):
        raise ConfigError(
            f"model {config.name_or_path!r} has num_labels={num_labels}; a cross-encoder needs 1 (a relevance "
            "logit) or 2 (not relevant / relevant). For an embedding model set model.kind: bi-encoder"
        )
    return tokenizer, num_labels


def label_token_ids(tokenizer, config: ModelConfig) -> list[int]:
    """The vocabulary ids of model.yes_token (and model.no_token when set), looked up as exact vocabulary
    entries with convert_tokens_to_ids, as the published recipes do."""
    ids = []
    for key in ("yes_token", "no_token"):
        token = getattr(config, key)
        if token is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if tid is None or (tid == unk and token != getattr(tokenizer, "unk_token", None)):
            raise ConfigError(
                f"model.{key} {token!r} is not a token of {config.name_or_path!r}'s vocabulary; give the exact "
                f"vocabulary entry (e.g. {tokenizer.convert_ids_to_tokens(tokenizer(token, add_special_tokens=False)['input_ids'])})"
            )
        ids.append(int(tid))
    return ids


def max_batch_tokens(config: ModelConfig, device: torch.device) -> int:
    if config.max_batch_tokens == "auto":
        return backends.default_max_batch_tokens(device)
    return int(config.max_batch_tokens)


def describe_model(config: ModelConfig, on_cluster: bool | None = None) -> dict:
    """Name, kind and revision (or content hash) of a model, validated but not loaded: an unsupported
    backend/dtype/device combination is a ConfigError here, before any cluster time is spent. On a cluster
    (`on_cluster`, see backends.planned_device) with model.device auto, the device-specific part waits for the
    actors' device (the batch job checks it once their GPUs are known)."""
    device = backends.planned_device(config, on_cluster)
    backends.check_model_on(config, device)
    _, num_labels = load_tokenizer_and_labels(config)
    choice = None
    if "auto" in (config.backend, config.dtype):
        if device is None:  # each actor resolves it on its own device and CPU
            choice = {"requested": f"{config.backend}/{config.dtype}", "reason": "resolved by each actor on its device"}
        else:
            resolved, choice = backends.resolve_auto(config, device)
            backends.log_choice(choice)
            config = resolved
    out = {
        "name_or_path": config.name_or_path,
        "kind": config.kind,
        "revision": model_fingerprint(config.name_or_path, config.revision),
        "num_labels": num_labels,
        "backend": config.backend,
        "dtype": config.dtype,
        "max_length": config.max_length,
        "device": str(device) if device else "auto (the actors')",
        "max_batch_tokens": max_batch_tokens(config, device) if device else config.max_batch_tokens,
    }
    if choice is not None:
        out["backend_choice"] = choice
    return out


@dataclass
class Encoded:
    """The model inputs of one call: one unit per (pair, window), in pair order; ``unit_pair[u]`` is the pair of
    unit u. Without windows there is one unit per pair."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    unit_pair: np.ndarray
    n_pairs: int


class _PairTemplate:
    """prefix + query + middle + passage + suffix: the special tokens a tokenizer adds around a pair (BERT's
    [CLS] q [SEP] p [SEP], RoBERTa's <s> q </s></s> p </s>, none for most decoders), learned from the tokenizer
    itself and checked on a second pair, so a pair built from separately tokenized (and cut) parts equals what
    ``tokenizer(query, passage)`` gives."""

    def __init__(self, tokenizer, name: str):
        self.parts = self._learn(tokenizer, "flow field", "the boundary layer of a wing")
        probe = ("what is heat transfer at mach 3", "shock")
        q, p = (tokenizer(x, add_special_tokens=False)["input_ids"] for x in probe)
        ids, types = self.build(q, p)
        enc = tokenizer(*probe)
        if ids != enc["input_ids"] or (types is not None and types != enc.get("token_type_ids")):
            raise ConfigError(
                f"cannot reproduce how {name!r}'s tokenizer joins a (query, passage) pair; "
                "report the model, or set model.kind to causal-lm with a prompt_template"
            )
        self.n_special = len(self.parts[0][0]) + len(self.parts[0][2]) + len(self.parts[0][4])

    @staticmethod
    def _learn(tokenizer, query: str, passage: str):
        q = tokenizer(query, add_special_tokens=False)["input_ids"]
        p = tokenizer(passage, add_special_tokens=False)["input_ids"]
        enc = tokenizer(query, passage)
        full, types = enc["input_ids"], enc.get("token_type_ids")
        i = next((k for k in range(len(full)) if full[k : k + len(q)] == q), None)
        j = None if i is None else next((k for k in range(i + len(q), len(full)) if full[k : k + len(p)] == p), None)
        if i is None or j is None:
            raise ConfigError("the model's tokenizer does not keep a pair's query and passage tokens as they are")
        segs = [(0, i), (i, i + len(q)), (i + len(q), j), (j, j + len(p)), (j + len(p), len(full))]
        ids = [full[a:b] for a, b in segs]
        type_parts = None if types is None else [types[a:b] for a, b in segs]
        if type_parts is not None:  # the query's and the passage's type: one value each
            type_parts[1] = types[i] if len(q) else 0
            type_parts[3] = types[j] if len(p) else 1
        return ids, type_parts

    def build(self, q: list[int], p: list[int]) -> tuple[list[int], list[int] | None]:
        ids, types = self.parts
        out = ids[0] + q + ids[2] + p + ids[4]
        if types is None:
            return out, None
        return out, types[0] + [types[1]] * len(q) + types[2] + [types[3]] * len(p) + types[4]


class _Prompt:
    """model.prompt_template split around its {query} and {text} fields: fixed text (the instruction
    included, never cut) and the two variable parts, in template order."""

    def __init__(self, config: ModelConfig, tokenizer):
        fields = {"instruction": config.instruction or ""}
        pieces: list[str] = [""]
        self.order: list[str] = []
        for literal, field, spec, conv in string.Formatter().parse(config.prompt_template or ""):
            pieces[-1] += literal
            if field is None:
                continue
            if field in ("query", "text"):
                self.order.append(field)
                pieces.append("")
            else:  # {instruction}: fixed text, never cut
                pieces[-1] += fields[field]
        self.fixed = pieces  # three strings: before, between, after the variable parts
        self.fixed_ids = [tokenizer(x, add_special_tokens=False)["input_ids"] if x else [] for x in pieces]
        self.n_fixed = sum(len(x) for x in self.fixed_ids)

    def format(self, query: str, text: str) -> str:
        values = {"query": query, "text": text}
        a, b = (values[f] for f in self.order)
        return self.fixed[0] + a + self.fixed[1] + b + self.fixed[2]

    def build(self, q: list[int], p: list[int]) -> list[int]:
        values = {"query": q, "text": p}
        a, b = (values[f] for f in self.order)
        f = self.fixed_ids
        return f[0] + a + f[1] + b + f[2]


class _CausalLM(backends.Backend):
    """An LLM reranker on torch: the logits of the yes (and no) tokens at each row's last position. Rows come
    left-padded, so the last position is the last real token and only its logits are computed (logits_to_keep);
    position ids count real tokens only, as in the unpadded prompt."""

    name = "torch"
    uses_token_type_ids = False

    def __init__(self, config: ModelConfig, device: torch.device, label_ids: list[int]):
        from transformers import AutoModelForCausalLM

        gpu_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.dtype)
        weights = gpu_dtype if (device.type == "cuda" and gpu_dtype is not None) else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(
            config.name_or_path, dtype=weights, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
        self.model.to(device).eval()
        self.device, self.label_ids, self.hf_config = device, label_ids, self.model.config
        self.autocast = device.type == "cpu" and config.dtype == "bfloat16"
        params = inspect.signature(self.model.forward).parameters
        self.keep_last = "logits_to_keep" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
        self.positions = "position_ids" in params

    def forward(self, input_ids, attention_mask, token_type_ids):
        ids = torch.from_numpy(input_ids).long().to(self.device)
        mask = torch.from_numpy(attention_mask).long().to(self.device)
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if self.positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            last = self.model(**kwargs).logits[:, -1, :]
            return last[:, self.label_ids].float().cpu().numpy()


class Scorer:
    """Scores (query, passage) pairs with a cross-encoder, a causal-LM reranker or a bi-encoder.

    >>> scorer = Scorer(ModelConfig(name_or_path="cross-encoder/ms-marco-MiniLM-L6-v2"))
    >>> scorer.score(["what is ray"], ["Ray is a framework for scaling Python."])
    """

    def __init__(self, config: ModelConfig):
        self.device = resolve_device(config.device)
        #: model.backend / model.dtype auto resolved for this device and CPU (backends.resolve_auto): self.config
        #: holds the concrete pair, self.backend_choice what was asked and why this (None without auto).
        config, self.backend_choice = backends.resolve_auto(config, self.device)
        backends.log_choice(self.backend_choice)
        self.config = config
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        self.tokenizer, num_labels = load_tokenizer_and_labels(config)
        self.num_labels: int | None = num_labels if config.kind != "bi-encoder" else None
        limit = min(config.max_length, _max_positions(self.tokenizer, None))
        if config.kind == "causal-lm":
            self._label_ids = label_token_ids(self.tokenizer, config)
            self.backend: backends.Backend = _CausalLM(config, self.device, self._label_ids)
            # Left: every row's last real token is the last position, the only one whose logits are computed.
            self.tokenizer.padding_side = "left"
        else:
            if config.kind == "cross-encoder":
                self._set_pad_token()
            self.backend = backends.load_backend(config, self.device, self.tokenizer, limit)
            if config.kind == "cross-encoder":
                self._sync_pad_token(self.backend.hf_config)
                # Right: every real token keeps its unpadded position (decoder classifiers included).
                self.tokenizer.padding_side = "right"
        self.max_length = min(config.max_length, _max_positions(self.tokenizer, self.backend.hf_config))
        # Texts are tokenized whole and cut by the rules below: no "longer than the maximum" warnings.
        self.tokenizer.model_max_length = 1 << 30
        self.max_batch_tokens = max_batch_tokens(config, self.device)
        #: units (windows; one per pair unless long_text is chunks) the last score()/logits() call scored
        self.last_windows = 0
        self._passage_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._tokenize_pool: ThreadPoolExecutor | None = None
        self._forward_lock = threading.Lock()
        self.stats = {"forward_passes": 0, "rows": 0, "tokens": 0, "padded_tokens": 0, "oom_splits": 0}
        if config.kind == "bi-encoder":
            self.max_query_length = config.max_query_length or self.max_length // 2
            return
        if config.kind == "cross-encoder":
            self._template = _PairTemplate(self.tokenizer, config.name_or_path)
            fixed = self._template.n_special
        else:
            self._prompt = _Prompt(config, self.tokenizer)
            fixed = self._prompt.n_fixed
        #: tokens a query and a passage share in one pair, less the special or template tokens
        self.budget = self.max_length - fixed
        self.max_query_length = config.max_query_length or self.budget // 2
        if self.budget - self.max_query_length < 1:
            what = "special tokens" if config.kind == "cross-encoder" else "prompt_template tokens"
            raise ConfigError(
                f"model.max_length {self.max_length} less {fixed} {what} leaves {self.budget} tokens for a query "
                f"and a passage, no more than model.max_query_length {self.max_query_length}: raise max_length or "
                "lower max_query_length"
            )

    def _set_pad_token(self) -> None:
        """Decoder models loaded for sequence classification often save no pad token: the eos token becomes it."""
        tok = self.tokenizer
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ConfigError(
                    f"the tokenizer of {self.config.name_or_path!r} has neither a pad nor an eos token; "
                    "save one with tokenizer.pad_token = ..."
                )
            tok.pad_token = tok.eos_token

    def _sync_pad_token(self, hf_config) -> None:
        """The model finds each row's last real token through config.pad_token_id: it must be the tokenizer's."""
        if hf_config is not None and getattr(hf_config, "pad_token_id", None) != self.tokenizer.pad_token_id:
            hf_config.pad_token_id = self.tokenizer.pad_token_id

    @functools.cached_property
    def info(self) -> ModelInfo:
        """Computed on first use: the fingerprint of a local folder hashes its files, which batch actors never
        need (the job's driver records it once)."""
        return ModelInfo(
            name_or_path=self.config.name_or_path,
            kind=self.config.kind,
            revision=model_fingerprint(self.config.name_or_path, self.config.revision),
            num_labels=self.num_labels,
            device=str(self.device),
            dtype=self.config.dtype,
            backend=self.config.backend,
            max_batch_tokens=self.max_batch_tokens,
            backend_choice=self.backend_choice,
        )

    # ------------------------------------------------------------------ public API

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """Scores aligned lists of queries and passages, model.activation applied; float32 of the same length."""
        if self.config.kind == "bi-encoder":
            q, p = self._formatted(queries, passages)
            self.last_windows = len(q)
            return self._score_bi(q, p) if q else np.zeros(0, dtype=np.float32)
        return self.from_logits(self.logits(queries, passages))

    def logits(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """A pair model's logits, float32 [n, num_labels] (causal-lm: [n, 1], logit(yes) - logit(no)), windows
        already reduced to one row per pair; `from_logits` turns them into scores."""
        if self.config.kind == "bi-encoder":
            raise ConfigError("logits() needs model.kind: cross-encoder or causal-lm")
        q, p = self._formatted(queries, passages)
        if not q:
            self.last_windows = 0
            return np.zeros((0, self.num_labels or 1), dtype=np.float32)
        enc = self._encode(q, p)
        self.last_windows = len(enc.input_ids)
        return self._reduce(self._forward(enc), enc)

    def from_logits(self, logits: np.ndarray, activation: str | None = None) -> np.ndarray:
        """Scores from logits: the logit (of the positive class for 2 labels), or with activation "sigmoid" a
        probability (softmax of the positive class for 2 labels; P(yes) over yes and no for causal-lm).
        Defaults to model.activation."""
        activation = activation or self.config.activation
        logits = np.asarray(logits, dtype=np.float32)
        if self.num_labels == 1:
            score = logits[:, 0]
            return _sigmoid(score) if activation == "sigmoid" else score
        return _sigmoid(logits[:, 1] - logits[:, 0]) if activation == "sigmoid" else logits[:, 1]

    def _formatted(self, queries: Sequence[str], passages: Sequence[str]) -> tuple[list[str], list[str]]:
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        q = [self.config.query_template.format(query=x) for x in queries]
        p = [self.config.passage_template.format(text=x) for x in passages]
        return q, p

    def rank(self, query: str, passages: Sequence[str], top_n: int | None = None) -> list[tuple[int, float]]:
        """(index, score) pairs best first; ties keep input order."""
        scores = self.score([query] * len(passages), passages)
        order = np.argsort(-scores, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        return [(int(i), float(scores[i])) for i in order]

    def first_cut(self, query: str, texts: Sequence[str], tokenizer=None) -> tuple[int, int, int] | None:
        """The first (query, text) pair of which scoring would cut something, as (index, tokens the whole pair
        needs, model's limit); index -1 when it is the query that would be cut. With long_text: chunks a long
        passage is windowed, not cut, so only the query counts. None when nothing would be cut. For the service's
        APIs that refuse rather than cut (TEI, NIM); `tokenizer` lets it check on its own thread."""
        tok = tokenizer or self.tokenizer
        query = self.config.query_template.format(query=query)
        texts = [self.config.passage_template.format(text=t) for t in texts]
        fixed = self.max_length - self.budget
        whole = None
        if self.config.kind == "causal-lm":
            whole = [len(x) for x in _ids(tok, [self._prompt.format(query, t) for t in texts])]
        nq = len(_ids(tok, [query])[0])
        lengths = [len(x) for x in _ids(tok, texts)]
        for i, n in enumerate(lengths):
            if whole is not None and whole[i] <= self.max_length:
                continue
            keep_q, keep_p = self._split(nq, n)
            if keep_q < nq:
                return -1, nq + n + fixed, self.max_length
            if keep_p < n and self.config.long_text == "truncate":
                return i, nq + n + fixed, self.max_length
        return None

    # ------------------------------------------------------------------ encode: pairs -> units

    def _split(self, nq: int, np_: int) -> tuple[int, int]:
        """Tokens kept of a query and of a passage: all when they fit in the budget; else the passage is cut
        first, the query only as far as needed to leave the passage budget - max_query_length tokens."""
        keep_q = min(nq, max(self.max_query_length, self.budget - np_))
        return keep_q, min(np_, self.budget - keep_q)

    def _windows(self, n: int, room: int) -> list[tuple[int, int]]:
        """Token spans of a passage of n tokens: [(0, room)] with long_text truncate; with chunks, overlapping
        windows of chunk_tokens (at most room) every chunk_stride tokens until the passage's end is covered."""
        if self.config.long_text == "truncate" or n <= room:
            return [(0, room)]
        cfg = self.config
        width = min(cfg.chunk_tokens or room, room)
        stride = min(cfg.chunk_stride or max(1, width // 2), width)
        spans, start = [], 0
        while True:
            spans.append((start, min(start + width, n)))
            if start + width >= n or len(spans) == cfg.max_windows:
                return spans
            start += stride

    def _encode(self, queries: list[str], passages: list[str]) -> Encoded:
        if self.config.kind == "causal-lm":
            return self._encode_prompts(queries, passages)
        q_ids = _unique_ids(self.tokenizer, queries)
        p_ids = _unique_ids(self.tokenizer, passages)
        ids, types, unit_pair = [], [], []
        template = self._template
        for k, (q, p) in enumerate(zip(queries, passages)):
            qi, pi = q_ids[q], p_ids[p]
            keep_q, keep_p = self._split(len(qi), len(pi))
            for a, b in self._windows(len(pi), keep_p):
                u_ids, u_types = template.build(qi[:keep_q], pi[a:b])
                ids.append(u_ids)
                types.append(u_types)
                unit_pair.append(k)
        has_types = template.parts[1] is not None
        return Encoded(ids, types if has_types else None, np.asarray(unit_pair, dtype=np.int64), len(queries))

    def _encode_prompts(self, queries: list[str], passages: list[str]) -> Encoded:
        """A prompt that fits is the formatted string tokenized whole, with no special tokens beyond what the
        template writes (exactly the one-pair reference); one that does not fit is built from the template's
        fixed parts and the query and document tokens, the document cut (or windowed) first."""
        prompt = self._prompt
        whole = _ids(self.tokenizer, [prompt.format(q, p) for q, p in zip(queries, passages)])
        long = [k for k, x in enumerate(whole) if len(x) > self.max_length]
        q_ids = _unique_ids(self.tokenizer, [queries[k] for k in long])
        p_ids = _unique_ids(self.tokenizer, [passages[k] for k in long])
        ids, unit_pair = [], []
        for k, x in enumerate(whole):
            if len(x) <= self.max_length:
                ids.append(x)
                unit_pair.append(k)
                continue
            qi, pi = q_ids[queries[k]], p_ids[passages[k]]
            keep_q, keep_p = self._split(len(qi), len(pi))
            for a, b in self._windows(len(pi), keep_p):
                ids.append(prompt.build(qi[:keep_q], pi[a:b]))
                unit_pair.append(k)
        return Encoded(ids, None, np.asarray(unit_pair, dtype=np.int64), len(queries))

    # ------------------------------------------------------------------ forward: units -> logits

    def _forward(self, enc: Encoded) -> np.ndarray:
        """One row of logits per unit, in unit order: [units, num_labels]; causal-lm: [units, 2 or 1], the
        last real token's logits of yes (and no). Batching and the forward pass are _run's."""
        width = len(self._label_ids) if self.config.kind == "causal-lm" else (self.num_labels or 1)
        out = np.empty((len(enc.input_ids), width), dtype=np.float32)

        def encode(start: int, end: int) -> dict[str, list[list[int]]]:
            block = {"input_ids": enc.input_ids[start:end]}
            if enc.token_type_ids is not None:
                block["token_type_ids"] = enc.token_type_ids[start:end]
            return block

        return self._run(len(enc.input_ids), encode, out)

    def _encode_texts(self, texts: list[str], max_length: int) -> dict[str, list[list[int]]]:
        enc = self.tokenizer(texts, truncation=True, max_length=max_length, padding=False)
        return {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}

    # ------------------------------------------------------------------ reduce: units -> one row per pair

    def _head(self, unit_logits: np.ndarray) -> np.ndarray:
        """causal-lm: logit(yes) - logit(no) (or logit(yes) alone without a no_token), one column."""
        if self.config.kind != "causal-lm":
            return unit_logits
        if unit_logits.shape[1] == 1:
            return unit_logits
        return (unit_logits[:, :1] - unit_logits[:, 1:2]).astype(np.float32)

    def _reduce(self, unit_logits: np.ndarray, enc: Encoded) -> np.ndarray:
        """One row per pair: a pair's only unit, or for windowed pairs the row of its best window by raw score
        (max), its first window (first), or the mean of its windows' logits (mean). The [0, 1] score is then the
        activation of that row, so raw and [0, 1] scores come from the same window."""
        rows = self._head(unit_logits)
        if len(rows) == enc.n_pairs:
            return rows
        starts = np.searchsorted(enc.unit_pair, np.arange(enc.n_pairs))
        ends = np.append(starts[1:], len(rows))
        raw = self.from_logits(rows, "none")
        out = np.empty((enc.n_pairs, rows.shape[1]), dtype=np.float32)
        how = self.config.chunk_aggregate
        for k, (a, b) in enumerate(zip(starts, ends)):
            if b - a == 1 or how == "first":
                out[k] = rows[a]
            elif how == "max":
                out[k] = rows[a + int(np.argmax(raw[a:b]))]
            else:
                out[k] = rows[a:b].mean(axis=0)
        return out

    # ------------------------------------------------------------------ bi-encoder

    def embed(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings (bi-encoder models), float32 [n, dim]."""
        if self.config.kind != "bi-encoder":
            raise ConfigError("embed() needs model.kind: bi-encoder")
        texts = list(texts)
        limit = max_length or self.max_length
        out = np.empty((len(texts), self.backend.hf_config.hidden_size), dtype=np.float32)
        return self._run(len(texts), lambda s, e: self._encode_texts(texts[s:e], limit), out)

    def _score_bi(self, queries: list[str], passages: list[str]) -> np.ndarray:
        # A passage's embedding does not depend on the query: embed each distinct text once, and keep recent
        # ones, since the same chunk is a candidate of many queries.
        unique_q = list(dict.fromkeys(queries))
        q_emb = self.embed(unique_q, max_length=self.max_query_length)
        unique_p = list(dict.fromkeys(passages))
        missing = [p for p in unique_p if p not in self._passage_cache]
        fresh = dict(zip(missing, self.embed(missing))) if missing else {}
        p_emb = np.stack([fresh[p] if p in fresh else self._passage_cache[p] for p in unique_p])
        for p in unique_p:
            self._remember(p, fresh.get(p))
        q_rows = _positions(queries, unique_q)
        p_rows = _positions(passages, unique_p)
        return np.einsum("ij,ij->i", q_emb[q_rows], p_emb[p_rows]).astype(np.float32)

    def _remember(self, passage: str, embedding: np.ndarray | None) -> None:
        cache, limit = self._passage_cache, self.config.embedding_cache
        if limit <= 0:
            return
        if embedding is None:
            if passage in cache:  # it may have been evicted by this very batch
                cache.move_to_end(passage)
            return
        cache[passage] = embedding
        if len(cache) > limit:
            cache.popitem(last=False)

    # ------------------------------------------------------------------ batching and the model

    def _run(self, n: int, encode: Callable[[int, int], dict[str, list[list[int]]]], out: np.ndarray) -> np.ndarray:
        """Fill out[i] with the model's features of item i. Items are tokenised block by block on a background
        thread (HF fast tokenizers release the GIL), one block ahead of the model, so tokenisation and padding
        overlap the forward passes; the model only ever sees int32 arrays."""
        if n == 0:
            return out
        if self._tokenize_pool is None:
            # One thread: a fast tokenizer must not be used by two threads at once.
            self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-tokenize")
        pending: deque = deque()
        # At least two blocks from 512 items on, so a call of a few hundred pairs overlaps too.
        block = min(BLOCK_ROWS, max(MIN_BLOCK_ROWS, -(-n // 2)))
        starts = iter(range(0, n, block))

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                end = min(n, start + block)
                pending.append(self._tokenize_pool.submit(self._prepare_block, encode, start, end))

        submit()
        submit()
        while pending:
            batches = pending.popleft().result()
            submit()
            for rows, ids, mask, types in batches:
                with self._forward_lock:
                    out[rows] = self._forward_or_split(ids, mask, types)
        return out

    def _forward_or_split(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None) -> np.ndarray:
        """One micro-batch through the model. On a device out-of-memory error the batch is split in halves and
        each half run on its own (down to one row, whose error is raised), and the token budget of later batches
        drops below what failed: scores do not depend on the batch a pair is in, so the result is the same."""
        try:
            return self.backend.forward(ids, mask, types)
        except Exception as err:  # only an out-of-memory error is handled; the rest is raised again
            if not _is_out_of_memory(err) or len(ids) <= 1:
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.max_batch_tokens = max(1, min(self.max_batch_tokens, ids.size // 2))
        self.stats["oom_splits"] += 1
        if self.stats["oom_splits"] == 1:
            log.warning(
                "out of device memory on a batch of %d x %d tokens: split in halves and retried; later batches "
                "hold at most %d padded tokens (set model.max_batch_tokens to start there)",
                ids.shape[0],
                ids.shape[1],
                self.max_batch_tokens,
            )
        half = len(ids) // 2
        parts = [slice(0, half), slice(half, len(ids))]
        return np.concatenate(
            [self._forward_or_split(ids[p], mask[p], types[p] if types is not None else None) for p in parts]
        )

    def _prepare_block(self, encode, start: int, end: int) -> list[tuple]:
        """Tokenise items [start, end) and cut them into padded int32 micro-batches: (rows, ids, mask, types)."""
        enc = encode(start, end)
        input_ids = enc["input_ids"]
        types = enc.get("token_type_ids") if self.backend.uses_token_type_ids else None
        pad_id = self.tokenizer.pad_token_id or 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        batches = []
        for idx in self._micro_batches([len(x) for x in input_ids]):
            width = max(len(input_ids[i]) for i in idx)
            ids = np.full((len(idx), width), pad_id, dtype=np.int32)
            mask = np.zeros((len(idx), width), dtype=np.int32)
            tt = np.zeros((len(idx), width), dtype=np.int32) if types is not None else None
            for r, i in enumerate(idx):
                seq = input_ids[i]
                cols = slice(width - len(seq), width) if left else slice(0, len(seq))
                ids[r, cols] = seq
                mask[r, cols] = 1
                if tt is not None:
                    tt[r, cols] = types[i]
            st = self.stats
            st["forward_passes"] += 1
            st["rows"] += len(idx)
            st["tokens"] += int(mask.sum())
            st["padded_tokens"] += ids.size
            batches.append((idx + start, ids, mask, tt))
        return batches

    def _micro_batches(self, lengths: list[int]) -> list[np.ndarray]:
        """Indices grouped into micro-batches of similar length, longest first (so OOM shows up at once): each
        is filled while (rows x its longest length) stays within max_batch_tokens and rows within batch_size.
        A sequence longer than the budget runs alone."""
        order = np.argsort(-np.asarray(lengths), kind="stable")
        budget, cap = self.max_batch_tokens, self.config.batch_size
        batches, start = [], 0
        while start < len(order):
            longest = max(1, lengths[order[start]])
            rows = max(1, min(cap, budget // longest))
            batches.append(order[start : start + rows])
            start += rows
        return batches


def _is_out_of_memory(err: BaseException) -> bool:
    """A device out-of-memory error: torch's (CUDA, MPS) or one a runtime reports in its message."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _max_positions(tokenizer, hf_config) -> int:
    limits = [getattr(hf_config, "max_position_embeddings", None), tokenizer.model_max_length]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 512


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function, float32."""
    return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))).astype(np.float32)


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as it is, no special tokens, nothing cut."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]


def _unique_ids(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    """Token ids of each distinct text (a query is usually shared by many pairs)."""
    unique = list(dict.fromkeys(texts))
    return dict(zip(unique, _ids(tokenizer, unique)))


def _positions(items: list[str], unique: list[str]) -> np.ndarray:
    index = {x: i for i, x in enumerate(unique)}
    return np.fromiter((index[x] for x in items), dtype=np.int64, count=len(items))


def default_threads(num_cpus: float) -> int:
    """torch threads for an actor that reserved num_cpus (Ray sets OMP_NUM_THREADS=1 for fractional actors)."""
    return max(1, min(os.cpu_count() or 1, round(num_cpus)))
