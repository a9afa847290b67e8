"""Pairs -> model inputs, with no model weights and no Ray: the CPU half of scoring.

A `PairEncoder` loads only the tokenizer and the Hugging Face AutoConfig (fast, a few MB), applies
model.query_template / passage_template, cuts or windows each pair by the rules below and returns an `Encoded`:
every unit's token ids concatenated (no padding) with their offsets, units sorted by token length (longest first,
stable), so that the model side (`pipelines.model.scoring.Scorer.score_encoded`) cuts micro-batches as contiguous
slices and pads them with a few numpy operations. `Encoded.to_arrays` / `from_arrays` give a plain-numpy form that
fits in an Arrow / Ray Data block, so a CPU stage can tokenise and a GPU stage only run the forward pass.

One encoder per model kind: `CrossEncoderPairs` ([CLS] q [SEP] p [SEP], as the tokenizer itself joins a pair),
`PromptCrossEncoderPairs` (a cross-encoder with model.prompt_template: ONE text with the tokenizer's single-text
specials, as NVIDIA's rerankers are scored), `PromptPairs` (causal-lm: model.prompt_template as written),
`TextEncoder` (bi-encoder: single texts; `encodes_pairs` False, since its pairs are scored from separate
embeddings). ``PairEncoder(config)`` builds the one of the config.

Truncation of a pair (cross-encoders and causal-lm prompts): nothing is cut when the whole pair fits in
max_length. When it does not, the passage is cut first; the query is cut only as far as needed to leave the
passage ``budget - max_query_length`` tokens (budget = max_length less the special or template tokens), or all
of the passage when it is shorter. So the query keeps max(max_query_length, budget - passage) tokens. With
``long_text: chunks`` a passage that does not fit is scored in overlapping windows instead, one unit each.
A one-string prompt that fits is the formatted string tokenized whole (exactly the reference recipe); one that
does not is rebuilt from its parts (specials, the template's fixed text, query, passage) with the passage cut or
windowed inside the template, where the recipes' ``truncation=True`` cuts the string's end (the end of the
template with it).

Shared with pipelines.model.backends (which must not import pipelines.model.scoring): `model_fingerprint`,
`label_token_ids`, `uses_token_type_ids`.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import ConfigError

if TYPE_CHECKING:  # pydantic is not needed to encode (jobs/gpu_check.py runs without it)
    from pipelines.config import ModelConfig


# ---------------------------------------------------------------------------------------------- model identity


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


def load_tokenizer_and_config(config: ModelConfig) -> tuple[Any, Any, int | None]:
    """The tokenizer and the Hugging Face config of a model, checked without loading weights: cheap enough for a
    driver to validate a job's model before any cluster time is spent. Returns (tokenizer, hf_config, num_labels or
    None for a bi-encoder; 1 for causal-lm)."""
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
        return tokenizer, hf_config, None
    if config.kind == "causal-lm":
        label_token_ids(tokenizer, config)
        return tokenizer, hf_config, 1
    num_labels = getattr(hf_config, "num_labels", 1)
    if num_labels not in (1, 2):
        raise ConfigError(
            f"model {config.name_or_path!r} has num_labels={num_labels}; a cross-encoder needs 1 (a relevance "
            "logit) or 2 (not relevant / relevant). For an embedding model set model.kind: bi-encoder"
        )
    return tokenizer, hf_config, num_labels


def load_tokenizer_and_labels(config: ModelConfig):
    """(tokenizer, num_labels or None): load_tokenizer_and_config without the config."""
    tokenizer, _, num_labels = load_tokenizer_and_config(config)
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


def uses_token_type_ids(tokenizer, hf_config) -> bool:
    """Whether the model takes token_type_ids: its tokenizer makes them and its config has a type embedding."""
    return (
        "token_type_ids" in getattr(tokenizer, "model_input_names", []) and getattr(hf_config, "type_vocab_size", 0) > 0
    )


#: Models that number positions from the padding themselves (padding_idx + 1 + the count of real tokens before):
#: their first padding_idx + 1 position embeddings are never a real token's, and no position ids are passed to them.
OWN_POSITION_IDS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer", "xmod"})


def max_positions(tokenizer, hf_config) -> int:
    """Tokens a model reads at most: its position embeddings (less the padding offset of the RoBERTa family, e.g.
    514 -> 512) and the tokenizer's model_max_length, whichever is smaller."""
    positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(positions, int) and getattr(hf_config, "model_type", "") in OWN_POSITION_IDS:
        pad = getattr(hf_config, "pad_token_id", None)
        positions -= (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
    limits = [positions, tokenizer.model_max_length]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 512


# ---------------------------------------------------------------------------------------------- the encoded form


@dataclass
class Encoded:
    """The model inputs of one call, unpadded: unit u (a pair, or one window of a pair with long_text: chunks) is
    ``ids[offsets[u]:offsets[u + 1]]`` (and ``types[...]`` when the model takes token_type_ids); ``unit_pair[u]``
    is its pair, 0 <= pair < n_pairs.

    Units are stored sorted by token length, longest first (stable), so the model side cuts micro-batches as
    contiguous slices. A pair's windows are all of one length but its last, which is no longer, so they keep
    their window order: a pair's first unit is its first window."""

    ids: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [units + 1]
    types: np.ndarray | None  # int8 [total tokens], or None when the model takes none
    unit_pair: np.ndarray  # int64 [units]
    n_pairs: int

    @property
    def n_units(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each unit, int64 [units]."""
        return np.diff(self.offsets)

    @property
    def input_ids(self) -> list[list[int]]:
        """Each unit's ids as a list, in stored (length) order: for inspection and tests, not the hot path."""
        return [self.ids[a:b].tolist() for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    @property
    def token_type_ids(self) -> list[list[int]] | None:
        if self.types is None:
            return None
        return [self.types[a:b].tolist() for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy: ids, offsets, unit_pair, n_pairs (a 1-element int64 array) and types (omitted when None)."""
        out = {
            "ids": self.ids,
            "offsets": self.offsets,
            "unit_pair": self.unit_pair,
            "n_pairs": np.asarray([self.n_pairs], dtype=np.int64),
        }
        if self.types is not None:
            out["types"] = self.types
        return out

    @classmethod
    def from_arrays(cls, d: dict[str, Any]) -> Encoded:
        """The inverse of to_arrays (any array-likes: numpy, lists, Arrow-backed arrays); types missing or None ->
        None."""
        types = d.get("types")
        return cls(
            ids=np.asarray(d["ids"], dtype=np.int32),
            offsets=np.asarray(d["offsets"], dtype=np.int64),
            types=None if types is None else np.asarray(types, dtype=np.int8),
            unit_pair=np.asarray(d["unit_pair"], dtype=np.int64),
            n_pairs=int(np.asarray(d["n_pairs"]).reshape(-1)[0]),
        )

    def subset(self, pairs: np.ndarray) -> Encoded:
        """The units of some pairs (`pairs`: sorted pair indices), renumbered 0..len(pairs)-1, still sorted by
        length: what scoring part of a call takes (isolating a pair the model fails on)."""
        pairs = np.asarray(pairs, dtype=np.int64)
        keep = np.isin(self.unit_pair, pairs)
        lengths = self.lengths[keep]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        token_keep = np.repeat(keep, self.lengths)
        return Encoded(
            ids=self.ids[token_keep],
            offsets=offsets,
            types=None if self.types is None else self.types[token_keep],
            unit_pair=np.searchsorted(pairs, self.unit_pair[keep]),
            n_pairs=len(pairs),
        )

    @classmethod
    def pack(cls, units: list[list[int]], types: list[list[int]] | None, unit_pair: Sequence[int], n_pairs: int):
        """Units in any order -> the stored form: sorted by length (longest first, stable) and concatenated."""
        lengths = np.fromiter(map(len, units), dtype=np.int64, count=len(units))
        order = np.argsort(-lengths, kind="stable")
        offsets = np.zeros(len(units) + 1, dtype=np.int64)
        np.cumsum(lengths[order], out=offsets[1:])
        total = int(offsets[-1])
        ids = np.fromiter(chain.from_iterable(units[i] for i in order), dtype=np.int32, count=total)
        tt = None
        if types is not None:
            tt = np.fromiter(chain.from_iterable(types[i] for i in order), dtype=np.int8, count=total)
        pairs = np.asarray(unit_pair, dtype=np.int64)[order]
        return cls(ids, offsets, tt, pairs, n_pairs)


# ---------------------------------------------------------------------------------------------- pair layouts


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


class _SingleTemplate:
    """prefix + text + suffix: the special tokens a tokenizer adds around ONE text (BERT's [CLS] t [SEP], Llama-3's
    <|begin_of_text|> t), learned from the tokenizer and checked on a second text, so that a one-string prompt built
    from separately tokenized (and cut) parts gets the same specials as ``tokenizer(prompt)``."""

    def __init__(self, tokenizer, name: str):
        self.prefix, self.suffix = self._learn(tokenizer, "the boundary layer of a wing")
        probe = "what is heat transfer at mach 3"
        body = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if self.prefix + body + self.suffix != tokenizer(probe)["input_ids"]:
            raise ConfigError(
                f"cannot reproduce the special tokens {name!r}'s tokenizer adds to one text; report the model"
            )
        self.n_special = len(self.prefix) + len(self.suffix)

    @staticmethod
    def _learn(tokenizer, text: str) -> tuple[list[int], list[int]]:
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        full = tokenizer(text)["input_ids"]
        i = next((k for k in range(len(full)) if full[k : k + len(body)] == body), None)
        if i is None:
            raise ConfigError("the model's tokenizer does not keep a text's tokens as they are")
        return full[:i], full[i + len(body) :]


class _Prompt:
    """model.prompt_template split around its {query} and {text} fields: fixed text (the instruction
    included, never cut) and the two variable parts, in template order."""

    def __init__(self, config: ModelConfig, tokenizer):
        fields = {"instruction": config.instruction or ""}
        pieces: list[str] = [""]
        self.order: list[str] = []
        for literal, field, _spec, _conv in string.Formatter().parse(config.prompt_template or ""):
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


# ---------------------------------------------------------------------------------------------- the encoders


class PairEncoder:
    """Tokenizer + AutoConfig of a model (no weights): (query, passage) pairs -> `Encoded`.

    ``PairEncoder(config)`` returns the encoder of config.kind (CrossEncoderPairs, PromptPairs or TextEncoder);
    a bad max_length / max_query_length is a ConfigError here, before any model loads.

    What the model side needs to pad is here too: ``pad_token_id`` and ``padding_side`` (left for causal-lm, so
    every row's last real token is the last position; right for cross-encoders, so every real token keeps its
    unpadded position)."""

    #: False for a bi-encoder, whose pairs are scored from separate embeddings (Scorer.score takes the texts).
    encodes_pairs = True
    kind = ""

    def __new__(cls, config: ModelConfig | None = None):
        kind_cls = cls
        if cls is PairEncoder and config is not None:
            one_string = config.kind == "cross-encoder" and config.prompt_template is not None
            kind_cls = PromptCrossEncoderPairs if one_string else _ENCODERS[config.kind]
        return super().__new__(kind_cls)

    def __init__(self, config: ModelConfig):
        self.config = config
        self.tokenizer, self.hf_config, self.num_labels = load_tokenizer_and_config(config)
        self._prepare_tokenizer()
        self.max_length = min(config.max_length, max_positions(self.tokenizer, self.hf_config))
        # Texts are tokenized whole and cut by the rules here: no "longer than the maximum" warnings.
        self.tokenizer.model_max_length = 1 << 30
        self.uses_token_type_ids = uses_token_type_ids(self.tokenizer, self.hf_config)
        self.padding_side = getattr(self.tokenizer, "padding_side", "right") or "right"

    def _prepare_tokenizer(self) -> None:
        """Kind-specific changes to the tokenizer (pad token, padding side) before anything is measured."""

    def adapt_model_config(self, hf_config) -> None:
        """What the loaded model's config must agree on with this tokenizer (nothing by default)."""

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def format(self, queries: Sequence[str], passages: Sequence[str]) -> tuple[list[str], list[str]]:
        """model.query_template and model.passage_template applied; the lists must be aligned."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        q = [self.config.query_template.format(query=x) for x in queries]
        p = [self.config.passage_template.format(text=x) for x in passages]
        return q, p

    def encode(self, queries: Sequence[str], passages: Sequence[str]) -> Encoded:
        """Aligned queries and passages (templates not yet applied) -> their units, sorted by length."""
        q, p = self.format(queries, passages)
        return self.encode_formatted(q, p)

    def encode_formatted(self, queries: list[str], passages: list[str]) -> Encoded:
        raise ConfigError(f"model.kind {self.kind} scores texts, not pairs: use Scorer.score")


class _Pairs(PairEncoder):
    """What cross-encoders and causal-lm prompts share: the budget of a pair and how it is cut or windowed."""

    #: special or template tokens of a pair (set by the subclass before _set_budget)
    n_fixed = 0

    def _set_budget(self, what: str) -> None:
        config = self.config
        #: tokens a query and a passage share in one pair, less the special or template tokens
        self.budget = self.max_length - self.n_fixed
        self.max_query_length = config.max_query_length or self.budget // 2
        if self.budget - self.max_query_length < 1:
            raise ConfigError(
                f"model.max_length {self.max_length} less {self.n_fixed} {what} leaves {self.budget} tokens for a "
                f"query and a passage, no more than model.max_query_length {self.max_query_length}: raise max_length "
                "or lower max_query_length"
            )

    def split(self, nq: int, np_: int) -> tuple[int, int]:
        """Tokens kept of a query and of a passage: all when they fit in the budget; else the passage is cut
        first, the query only as far as needed to leave the passage budget - max_query_length tokens."""
        keep_q = min(nq, max(self.max_query_length, self.budget - np_))
        return keep_q, min(np_, self.budget - keep_q)

    def cut(self, qi: list[int], pi: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        """A pair's (query tokens, passage tokens) units: cut by `split`, the passage windowed by `windows`."""
        keep_q, keep_p = self.split(len(qi), len(pi))
        for a, b in self.windows(len(pi), keep_p):
            yield qi[:keep_q], pi[a:b]

    def windows(self, n: int, room: int) -> list[tuple[int, int]]:
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

    def _whole_lengths(self, query: str, texts: list[str], tok) -> list[int] | None:
        """Tokens of each whole pair when the encoder tokenizes a pair that fits as one string (causal-lm)."""
        return None

    def first_cut(self, query: str, texts: Sequence[str], tokenizer=None) -> tuple[int, int, int] | None:
        """The first (query, text) pair of which encoding would cut something, as (index, tokens the whole pair
        needs, model's limit); index -1 when it is the query that would be cut. With long_text: chunks a long
        passage is windowed, not cut, so only the query counts. None when nothing would be cut. `tokenizer` lets
        a caller check on its own thread (a fast tokenizer must not be used by two threads at once)."""
        tok = tokenizer or self.tokenizer
        query = self.config.query_template.format(query=query)
        texts = [self.config.passage_template.format(text=t) for t in texts]
        whole = self._whole_lengths(query, texts, tok)
        nq = len(_ids(tok, [query])[0])
        lengths = [len(x) for x in _ids(tok, texts)]
        for i, n in enumerate(lengths):
            if whole is not None and whole[i] <= self.max_length:
                continue
            keep_q, keep_p = self.split(nq, n)
            if keep_q < nq:
                return -1, nq + n + self.n_fixed, self.max_length
            if keep_p < n and self.config.long_text == "truncate":
                return i, nq + n + self.n_fixed, self.max_length
        return None


class _SequenceClassifier:
    """What every cross-encoder's encoder does to the tokenizer and the model config (a pair or a one-string prompt)."""

    config: ModelConfig
    tokenizer: Any

    def _prepare_tokenizer(self) -> None:
        """Decoder models loaded for sequence classification often save no pad token: the eos token becomes it
        (the Scorer sets the model config's pad_token_id to match: the model finds each row's last real token by
        it). The padding side is model.padding_side, auto meaning the side the tokenizer saves: positions count
        real tokens on either side (the model side passes them), so scores do not depend on it."""
        tok = self.tokenizer
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ConfigError(
                    f"the tokenizer of {self.config.name_or_path!r} has neither a pad nor an eos token; "
                    "save one with tokenizer.pad_token = ..."
                )
            tok.pad_token = tok.eos_token
        side = self.config.padding_side
        tok.padding_side = side if side != "auto" else (getattr(tok, "padding_side", None) or "right")

    def adapt_model_config(self, hf_config) -> None:
        """The model finds each row's last real token through config.pad_token_id: it must be the tokenizer's."""
        if hf_config is not None and getattr(hf_config, "pad_token_id", None) != self.tokenizer.pad_token_id:
            hf_config.pad_token_id = self.tokenizer.pad_token_id


class CrossEncoderPairs(_SequenceClassifier, _Pairs):
    """Sequence classification over (query, passage): [CLS] q [SEP] p [SEP] (or the tokenizer's own joining)."""

    kind = "cross-encoder"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.template = _PairTemplate(self.tokenizer, config.name_or_path)
        self.n_fixed = self.template.n_special
        # The pair's types are needed only by a model with a type embedding.
        self.uses_token_type_ids = self.uses_token_type_ids and self.template.parts[1] is not None
        self._set_budget("special tokens")

    def encode_formatted(self, queries: list[str], passages: list[str]) -> Encoded:
        q_ids = _unique_ids(self.tokenizer, queries)
        p_ids = _unique_ids(self.tokenizer, passages)
        with_types = self.uses_token_type_ids
        template = self.template
        ids: list[list[int]] = []
        types: list[list[int]] = []
        unit_pair: list[int] = []
        for k, (q, p) in enumerate(zip(queries, passages)):
            for qs, ps in self.cut(q_ids[q], p_ids[p]):
                u_ids, u_types = template.build(qs, ps)
                ids.append(u_ids)
                if with_types:
                    types.append(u_types)
                unit_pair.append(k)
        return Encoded.pack(ids, types if with_types else None, unit_pair, len(queries))


class PromptPairs(_Pairs):
    """One-string prompts: model.prompt_template around the query and the passage, tokenized as ONE text. causal-lm
    (LLM rerankers): as written, no special tokens added, left padding. A cross-encoder with a prompt_template
    (`PromptCrossEncoderPairs`): with the tokenizer's single-text special tokens, as ``tokenizer(prompt)``."""

    kind = "causal-lm"
    #: the tokenizer's single-text special tokens go around the prompt (cross-encoders)
    add_special_tokens = False

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self._prepare_labels()
        self.prompt = _Prompt(config, self.tokenizer)
        self.specials = _SingleTemplate(self.tokenizer, config.name_or_path) if self.add_special_tokens else None
        self.n_fixed = self.prompt.n_fixed + (self.specials.n_special if self.specials else 0)
        self._set_budget("prompt_template tokens")
        #: The prompt's tokens are its parts' tokens (a pre-tokenizer that splits at whitespace and punctuation,
        #: as BERT's does, and checked on probes): pairs are built from each distinct query and passage tokenized
        #: once, as the pair path does, instead of every prompt whole.
        self.composable = self._composable()

    def _composable(self) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        pre = getattr(backend, "pre_tokenizer", None)
        if pre is None or type(pre).__name__ != "BertPreTokenizer":
            return False
        before, after = (self.specials.prefix, self.specials.suffix) if self.specials else ([], [])
        probes = [
            ("what is heat transfer", "the boundary layer of a wing"),
            ("Mach 3?", "Shock-wave: naïve café, 東京 (x=1.5e-3)."),
            ("", "a"),
            ("q", "x" * 40 + " y"),
        ]
        for q, t in probes:
            whole = self.tokenizer(self.prompt.format(q, t), add_special_tokens=self.add_special_tokens)["input_ids"]
            parts = _ids(self.tokenizer, [q, t])
            if before + self.prompt.build(parts[0], parts[1]) + after != whole:
                return False
        return True

    def _prepare_labels(self) -> None:
        self.label_ids = label_token_ids(self.tokenizer, self.config)
        self.uses_token_type_ids = False

    def _prepare_tokenizer(self) -> None:
        # Left: every row's last real token is the last position, the only one whose logits are computed.
        self.tokenizer.padding_side = "left"

    def _whole_lengths(self, query: str, texts: list[str], tok) -> list[int]:
        prompts = [self.prompt.format(query, t) for t in texts]
        return [len(x) for x in _ids(tok, prompts, self.add_special_tokens)]

    def encode_formatted(self, queries: list[str], passages: list[str]) -> Encoded:
        """A prompt that fits is the formatted string tokenized whole (causal-lm: with no special tokens beyond what
        the template writes; a cross-encoder: with the tokenizer's single-text specials): exactly the one-pair
        reference. One that does not fit is built from the specials, the template's fixed parts and the query and
        document tokens, the document cut (or windowed) first, so the template and the query survive."""
        prompt = self.prompt
        if self.composable:
            return self._encode_parts(queries, passages)
        texts = [prompt.format(q, p) for q, p in zip(queries, passages)]
        # Each prompt tokenized once where possible: those that likely fit (by their bytes, at the tokens per byte
        # of this batch's whole prompts) whole first; the others as parts first, and whole too only when the parts
        # leave them within a few tokens of fitting. A guess that misses costs a second tokenization, never a
        # wrong id: what is kept whole is always the whole prompt's tokenization, checked against max_length.
        nbytes = [len(t.encode()) for t in texts]
        sample = texts[: min(len(texts), 64)]
        sampled = _ids(self.tokenizer, sample, self.add_special_tokens)
        per_byte = sum(map(len, sampled)) / max(1, sum(nbytes[: len(sample)]))
        first = [k for k in range(len(texts)) if k < len(sample) or nbytes[k] * per_byte <= 1.1 * self.max_length]
        whole: dict[int, list[int]] = dict(enumerate(sampled))
        rest = [k for k in first if k >= len(sample)]
        whole.update(zip(rest, _ids(self.tokenizer, [texts[k] for k in rest], self.add_special_tokens)))
        long = [k for k in range(len(texts)) if k not in whole or len(whole[k]) > self.max_length]
        q_ids = _unique_ids(self.tokenizer, [queries[k] for k in long])
        p_ids = _unique_ids(self.tokenizer, [passages[k] for k in long])
        near = [
            k
            for k in long
            if k not in whole and len(q_ids[queries[k]]) + len(p_ids[passages[k]]) + self.n_fixed <= self.max_length + 8
        ]
        whole.update(zip(near, _ids(self.tokenizer, [texts[k] for k in near], self.add_special_tokens)))
        before, after = (self.specials.prefix, self.specials.suffix) if self.specials else ([], [])
        ids: list[list[int]] = []
        unit_pair: list[int] = []
        for k in range(len(texts)):
            x = whole.get(k)
            if x is not None and len(x) <= self.max_length:
                ids.append(x)
                unit_pair.append(k)
                continue
            for qs, ps in self.cut(q_ids[queries[k]], p_ids[passages[k]]):
                ids.append(before + prompt.build(qs, ps) + after)
                unit_pair.append(k)
        return self._packed(ids, unit_pair, len(queries))

    def _packed(self, ids: list[list[int]], unit_pair: list[int], n_pairs: int) -> Encoded:
        out = Encoded.pack(ids, None, unit_pair, n_pairs)
        if self.uses_token_type_ids:  # one text: every token's type is 0
            out.types = np.zeros(len(out.ids), dtype=np.int8)
        return out

    def _encode_parts(self, queries: list[str], passages: list[str]) -> Encoded:
        """Every pair built from its query's and passage's tokens (each distinct text tokenized once): equal to the
        whole prompt's tokens for a composable tokenizer; cut or windowed inside the template when too long."""
        q_ids = _unique_ids(self.tokenizer, queries)
        p_ids = _unique_ids(self.tokenizer, passages)
        before, after = (self.specials.prefix, self.specials.suffix) if self.specials else ([], [])
        build = self.prompt.build
        ids: list[list[int]] = []
        unit_pair: list[int] = []
        for k, (q, p) in enumerate(zip(queries, passages)):
            for qs, ps in self.cut(q_ids[q], p_ids[p]):
                ids.append(before + build(qs, ps) + after)
                unit_pair.append(k)
        return self._packed(ids, unit_pair, len(queries))


class PromptCrossEncoderPairs(_SequenceClassifier, PromptPairs):
    """A cross-encoder (any ...ForSequenceClassification, remote code included) reading a one-string prompt, e.g.
    NVIDIA's rerankers: ``question:{query} \\n \\n passage:{text}`` tokenized with the tokenizer's single-text
    specials (one <|begin_of_text|> for Llama-3), not joined as a pair. Token types, where the model takes them, are
    all 0, as for one text."""

    kind = "cross-encoder"
    add_special_tokens = True

    def _prepare_labels(self) -> None:
        self.label_ids = []
        # One text: its token types are all 0 (only a model with a type embedding takes them).
        self.uses_token_type_ids = uses_token_type_ids(self.tokenizer, self.hf_config)


class TextEncoder(PairEncoder):
    """bi-encoder: single texts (a query or a passage) with the tokenizer's special tokens, cut at max_length.
    Its pairs are not encoded together (encodes_pairs False): Scorer.score embeds each distinct text once."""

    kind = "bi-encoder"
    encodes_pairs = False

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.max_query_length = config.max_query_length or self.max_length // 2

    def _prepare_tokenizer(self) -> None:
        side = self.config.padding_side
        self.tokenizer.padding_side = "right" if side == "auto" else side

    def encode_texts(self, texts: Sequence[str], max_length: int | None = None) -> Encoded:
        """One unit per text (unit_pair = the text's index), cut at max_length (default: the model's)."""
        texts = list(texts)
        if not texts:
            return Encoded.pack([], None, [], 0)
        limit = max_length or self.max_length
        enc = self.tokenizer(texts, truncation=True, max_length=limit, padding=False)
        types = enc.get("token_type_ids") if self.uses_token_type_ids else None
        return Encoded.pack(enc["input_ids"], types, range(len(texts)), len(texts))


_ENCODERS: dict[str, type[PairEncoder]] = {
    "cross-encoder": CrossEncoderPairs,
    "causal-lm": PromptPairs,
    "bi-encoder": TextEncoder,
}


def _ids(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text as it is (with the tokenizer's single-text special tokens when asked), nothing cut.
    A fast tokenizer's Rust backend is called directly where it gives the same ids as the tokenizer (checked once
    per tokenizer on probe texts): no offsets, no Python wrapper per text, about a fifth less CPU per text."""
    if not texts:
        return []
    backend = _backend(tokenizer)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    return tokenizer(texts, add_special_tokens=add_special_tokens, truncation=False)["input_ids"]


_PROBES = (
    "what is heat transfer at mach 3",
    "  The Boundary-Layer  of a wing; x=1.5e-3 (approx.)\n\nNext paragraph: naïve café, 東京 ✓",
    "question:how to cut a pair \n \n passage:the passage text",
)


def _backend(tokenizer):
    """The Rust tokenizer behind a fast tokenizer, with no truncation or padding of its own, when it gives the
    same ids as ``tokenizer(...)`` on the probe texts (with and without special tokens); else None."""
    cached = tokenizer.__dict__.get("_rerank_backend", False)
    if cached is not False:
        return cached
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False) or not hasattr(backend, "encode_batch_fast"):
        backend = None
    else:
        try:
            backend.no_truncation()
            backend.no_padding()
            for special in (False, True):
                want = tokenizer(list(_PROBES), add_special_tokens=special, truncation=False)["input_ids"]
                # the call above may set the backend's truncation or padding again: clear them for ours
                backend.no_truncation()
                backend.no_padding()
                got = [e.ids for e in backend.encode_batch_fast(list(_PROBES), add_special_tokens=special)]
                if got != want:
                    backend = None
                    break
        except Exception:  # noqa: BLE001 - anything unusual: the tokenizer's own call
            backend = None
    tokenizer.__dict__["_rerank_backend"] = backend
    return backend


def _unique_ids(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    """Token ids of each distinct text (a query is usually shared by many pairs)."""
    unique = list(dict.fromkeys(texts))
    return dict(zip(unique, _ids(tokenizer, unique)))
