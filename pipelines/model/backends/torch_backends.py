"""The torch backends: cross-encoder logits or bi-encoder pooled embeddings (`TorchBackend`), an LLM reranker's
yes/no logits (`CausalLMBackend`), and the head-only last layer of BERT-family cross-encoders."""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.model.backends.base import Backend
from pipelines.model.encoding import OWN_POSITION_IDS, uses_token_type_ids

if TYPE_CHECKING:
    from pipelines.config import ModelConfig

log = logging.getLogger(__name__)


class _TorchDevice:
    """Host arrays in and device tensors out, the torch way: on CUDA each input is copied into pinned (page-locked)
    host memory and sent with non_blocking=True, so the copy overlaps the previous micro-batch's kernels (torch's
    caching host allocator keeps a pinned block until its copy has finished); outputs stay on the device until
    to_host makes one copy of all of them."""

    device: torch.device

    def _input(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def to_host(self, parts: list) -> np.ndarray:
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        if isinstance(parts[0], torch.Tensor):
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            return out.float().cpu().numpy()
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.to_host([self.forward_device(input_ids, attention_mask, token_type_ids)])




#: Encoders whose pooling or head reads the first position ([CLS] / <s>): left padding would put a pad there, so
#: they are always padded right (model.padding_side left is logged and ignored for them).
FIRST_TOKEN_MODEL_TYPES = frozenset(
    {
        "albert", "bert", "big_bird", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
        "longformer", "modernbert", "mpnet", "roberta", "xlm-roberta", "xlm-roberta-xl", "xmod",
    }
)  # fmt: skip


def left_padded(mask: torch.Tensor) -> bool:
    return bool(mask.shape[1] and (mask[:, 0] == 0).any())


#: Encoders whose sequence-classification head reads the first token only, and whose layers are BERT's
#: (attention.self.query/key/value, attention.output, intermediate, output). Their last layer can be computed for
#: that token alone.
HEAD_ONLY_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})


class _HeadOnlyLastLayer(torch.nn.Module):
    """A BERT-family encoder's last layer, computed for the first token only: all that a first-token
    classification head (BERT's pooler, RoBERTa/XLM-R/ELECTRA's classifier) reads. Keys and values still come from
    every token; the query projection, the attention output, the feed-forward block and both layer norms run
    for one position instead of all of them, which saves 10/12 of a layer's matmul FLOPs (about 14% of a
    6-layer model). The same arithmetic on the same inputs, so scores match the full layer to float rounding;
    `head_only_last_layer` checks that on a probe batch before using it."""

    def __init__(self, layer: torch.nn.Module, returns_tuple: bool):
        super().__init__()
        self.layer, self.returns_tuple = layer, returns_tuple
        self.mask: torch.Tensor | None = None  # [n, L] attention mask of the current call, set by _Features

    def forward(self, hidden_states, *args, **kwargs):
        if self.mask is not None and left_padded(self.mask):  # the first position is padding: the full layer
            return self.layer(hidden_states, *args, **kwargs)
        layer = self.layer
        attn = layer.attention.self
        n, length, _ = hidden_states.shape
        heads, size = attn.num_attention_heads, attn.attention_head_size
        first = hidden_states[:, :1]
        q = attn.query(first).view(n, 1, heads, size).transpose(1, 2)
        k = attn.key(hidden_states).view(n, length, heads, size).transpose(1, 2)
        v = attn.value(hidden_states).view(n, length, heads, size).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (size**-0.5)
        if self.mask is not None:
            scores = scores.masked_fill(self.mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        context = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        context = context.transpose(1, 2).reshape(n, 1, heads * size)
        attended = layer.attention.output(context, first)
        out = layer.output(layer.intermediate(attended), attended)
        return (out,) if self.returns_tuple else out


def _encoder_layers(model: torch.nn.Module):
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def head_only_last_layer(features: _Features) -> bool:
    """Swap a cross-encoder's last encoder layer for `_HeadOnlyLastLayer` where the architecture allows it and a
    probe batch (two pairs, one padded) scores the same as the full model; return whether it was swapped.
    Anything else (other architectures, relative positions, a transformers version whose layers differ) keeps
    the full model."""
    model = features.model
    cfg = getattr(model, "config", None)
    layers = _encoder_layers(model)
    if (
        features.kind != "cross-encoder"
        or layers is None
        or getattr(cfg, "model_type", None) not in HEAD_ONLY_MODEL_TYPES
        or getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute")
        or getattr(cfg, "is_decoder", False)
        or not all(hasattr(layers[-1], a) for a in ("attention", "intermediate", "output"))
    ):
        return False
    last = layers[-1]
    device = next(model.parameters()).device
    vocab = int(getattr(cfg, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), min(vocab, 2000), (2, 12), generator=gen, dtype=torch.int32)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids, mask = ids.to(device), mask.to(device)
    tt = torch.zeros_like(ids) if getattr(cfg, "type_vocab_size", 0) > 0 else None
    kinds: list[bool] = []
    hook = last.register_forward_hook(lambda _m, _i, out: kinds.append(isinstance(out, tuple)))
    try:
        with torch.inference_mode():
            ref = features(ids, mask, tt).float()
        hook.remove()
        layers[-1] = features.head_layer = _HeadOnlyLastLayer(last, returns_tuple=bool(kinds and kinds[0]))
        with torch.inference_mode():
            got = features(ids, mask, tt).float()
        tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
        ok = got.shape == ref.shape and bool(((got - ref).abs() <= tol * (1 + ref.abs())).all())
    except Exception as err:  # noqa: BLE001 - any incompatibility means: keep the full layer
        log.info("head-only last layer not usable for %s: %s", type(model).__name__, err)
        ok = False
    finally:
        hook.remove()  # no-op when already removed; here for the paths that raised before it
    if not ok:
        layers[-1] = last
        features.head_layer = None
        log.info(
            "head-only last layer does not match the full layer for %s; using the full model", type(model).__name__
        )
    return ok


class _Features(torch.nn.Module):
    """The model plus the part that turns its output into features: the logits, or the pooled embedding."""

    def __init__(self, model: torch.nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind
        #: Set by head_only_last_layer when it swaps the last layer; it needs each call's attention mask.
        self.head_layer: _HeadOnlyLastLayer | None = None
        cfg = getattr(model, "config", None)
        params = inspect.signature(model.forward).parameters
        #: Left-padded rows get position ids counting their real tokens only, so that every row is numbered as
        #: it would be alone (absolute positions; rotary ones do not need it but are not hurt).
        self.positions_from_mask = "position_ids" in params and getattr(cfg, "model_type", "") not in OWN_POSITION_IDS

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if self.head_layer is not None:
            self.head_layer.mask = attention_mask
        kwargs = {"input_ids": input_ids.long(), "attention_mask": attention_mask.long()}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids.long()
        if self.positions_from_mask and not torch.jit.is_tracing() and left_padded(attention_mask):
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(**kwargs)
        if self.kind == "cross-encoder":
            return out.logits.float()
        hidden = out.last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def load_hf_model(config: ModelConfig, attn: str | None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The Hugging Face model of config.kind, attention implementation `attn` where the model supports it."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if config.kind == "cross-encoder" else AutoModel
    kwargs: dict[str, Any] = {
        "revision": config.revision,
        "trust_remote_code": config.trust_remote_code,
        "dtype": dtype,
    }
    if attn:
        try:
            return cls.from_pretrained(config.name_or_path, attn_implementation=attn, **kwargs).eval()
        except (ValueError, ImportError) as err:  # the architecture does not support it
            log.info(
                "attn_implementation=%s not available for %s (%s); using the default", attn, config.name_or_path, err
            )
    return cls.from_pretrained(config.name_or_path, **kwargs).eval()


class TorchBackend(_TorchDevice, Backend):
    """torch with SDPA attention. CPU: float32, or bfloat16 through autocast (weights stay float32: casting them
    scrambled close scores). GPU: float16/bfloat16 weights (float32 when asked)."""

    name = "torch"
    pads_left = True

    def __init__(self, config: ModelConfig, device: torch.device, tokenizer):
        self.device = device
        gpu_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.dtype)
        weights = gpu_dtype if (device.type == "cuda" and gpu_dtype is not None) else torch.float32
        self.model = _Features(load_hf_model(config, "sdpa", weights), config.kind).to(device).eval()
        model_type = getattr(self.model.model.config, "model_type", "")
        self.pads_left = model_type not in FIRST_TOKEN_MODEL_TYPES
        if not self.pads_left and config.padding_side == "left":
            log.info(
                "model.padding_side left ignored for %s: its head reads the first position; padded right", model_type
            )
        #: The last layer runs for the first token only (cross-encoders of the BERT family; see _HeadOnlyLastLayer).
        self.head_only = head_only_last_layer(self.model)
        self.hf_config = self.model.model.config
        self.uses_token_type_ids = uses_token_type_ids(tokenizer, self.hf_config)
        self.autocast = device.type == "cpu" and config.dtype == "bfloat16"

    def forward_device(self, input_ids, attention_mask, token_type_ids):
        ids, mask = self._input(input_ids), self._input(attention_mask)
        tt = None
        if token_type_ids is not None and self.uses_token_type_ids:
            tt = self._input(token_type_ids)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(ids, mask, tt).float()


class CausalLMBackend(_TorchDevice, Backend):
    """An LLM reranker on torch: logit(yes) - logit(no) (or logit(yes) alone) at each row's last position, one
    column. Rows come
    left-padded, so the last position is the last real token and only its logits are computed (logits_to_keep);
    position ids count real tokens only, as in the unpadded prompt."""

    name = "torch"
    uses_token_type_ids = False
    pads_left = True

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

    def forward_device(self, input_ids, attention_mask, token_type_ids):
        ids = self._input(input_ids).long()
        mask = self._input(attention_mask).long()
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if self.positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            labels = self.model(**kwargs).logits[:, -1, self.label_ids].float()
            # One column: logit(yes) - logit(no), or logit(yes) alone without a no_token.
            return labels[:, :1] - labels[:, 1:2] if labels.shape[1] == 2 else labels
