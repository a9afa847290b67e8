"""Small models built locally and saved with save_pretrained, so tests load them through the real
from_pretrained path users take, without any download."""

from __future__ import annotations

import string
from pathlib import Path

import torch

WORDS = (  # noqa: SIM905
    "the of and a to in is for on with by at from as that this are be an or it which flow boundary "
    "layer pressure heat transfer wing supersonic mach number shock wave what how ray data model "
    "rank query passage"
).split()


def _write_tokenizer(path: Path) -> None:
    from transformers import BertTokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars, *("##" + c for c in chars)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tok = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True, model_max_length=128)
    tok.save_pretrained(path)


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.5,
        **extra,
    )


def build_cross_encoder(path: str | Path, num_labels: int = 1, seed: int = 0) -> Path:
    """A tiny BertForSequenceClassification with a seeded random init."""
    from transformers import BertForSequenceClassification

    path = Path(path)
    _write_tokenizer(path)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_bert_config(num_labels=num_labels))
    model.save_pretrained(path)
    return path


def build_bi_encoder(path: str | Path, seed: int = 0) -> Path:
    """A tiny BertModel used as an embedding model (mean pooling)."""
    from transformers import BertModel

    path = Path(path)
    _write_tokenizer(path)
    torch.manual_seed(seed)
    BertModel(_bert_config()).save_pretrained(path)
    return path
