"""Small models built locally and saved with save_pretrained, so tests load them through the real
from_pretrained path users take, without any download."""

from __future__ import annotations

import functools
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


def build_encoder_classifier(path: str | Path, arch: str, seed: int = 0, **extra) -> Path:
    """A tiny sequence classifier of another encoder family (roberta, xlm-roberta, electra; bert with `extra`
    config keys such as position_embedding_type), with the tiny BERT tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    _write_tokenizer(path)
    base = _bert_config(**extra).to_dict()
    keep = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "initializer_range",
        *extra,
    )
    kwargs = {k: base[k] for k in keep} | {"num_labels": 1}
    if arch != "bert":
        kwargs.update(pad_token_id=0, max_position_embeddings=140)  # roberta positions start after the pad id
    if arch == "electra":
        kwargs["embedding_size"] = 32
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(AutoConfig.for_model(arch, **kwargs)).save_pretrained(path)
    return path


def build_bi_encoder(path: str | Path, seed: int = 0) -> Path:
    """A tiny BertModel used as an embedding model (mean pooling)."""
    from transformers import BertModel

    path = Path(path)
    _write_tokenizer(path)
    torch.manual_seed(seed)
    BertModel(_bert_config()).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- decoders

CRANFIELD = Path(__file__).resolve().parent.parent / "pipelines" / "data" / "cranfield" / "cran.all.1400"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.cache
def _bpe_json(vocab_size: int = 800) -> str:
    """A byte-level BPE tokenizer trained on the Cranfield abstracts (the way GPT-2/Qwen tokenizers are built);
    'yes' and 'no' are whole vocabulary entries. Trained once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = [x for x in CRANFIELD.read_text().splitlines() if x and not x.startswith(".")]
    tok.train_from_iterator(lines + ["yes", "no"] * 5000, trainer=trainer)
    for word in ("yes", "no"):
        assert tok.token_to_id(word) is not None, word
    return tok.to_str()


def _write_bpe_tokenizer(path: Path, padding_side: str, pad_token: bool) -> None:
    """The Cranfield BPE tokenizer saved so AutoTokenizer.from_pretrained loads it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>" if pad_token else None,
        padding_side=padding_side,
        model_max_length=512,
    )
    fast.save_pretrained(path)


def _qwen3_config(vocab_size: int, **extra):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.5,
        tie_word_embeddings=False,
        **extra,
    )


def build_causal_lm(path: str | Path, padding_side: str = "left", seed: int = 0) -> Path:
    """A two-layer Qwen3ForCausalLM (the architecture of Qwen3-Reranker) with a Cranfield BPE tokenizer."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    path = Path(path)
    _write_bpe_tokenizer(path, padding_side, pad_token=True)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    cfg = _qwen3_config(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


def build_decoder_classifier(
    path: str | Path, num_labels: int = 1, padding_side: str = "right", pad_token: bool = False, seed: int = 0
) -> Path:
    """A two-layer Qwen3ForSequenceClassification (the shape of decoder rerankers converted to a score head).
    By default neither the tokenizer nor the model config has a pad token, as with many decoder checkpoints."""
    from transformers import AutoTokenizer, Qwen3ForSequenceClassification

    path = Path(path)
    _write_bpe_tokenizer(path, padding_side, pad_token=pad_token)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    cfg = _qwen3_config(len(tok), num_labels=num_labels, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    Qwen3ForSequenceClassification(cfg).save_pretrained(path)
    return path


_SIMULATED = '''"""A simulated accelerator for tests: a sequence classifier that scores at a fixed rate without using CPU (it
sleeps per batch, releasing the GIL) and returns deterministic scores (a hash of each row's real tokens)."""

import time

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class SimulatedConfig(PretrainedConfig):
    model_type = "rerank-simulated"

    def __init__(self, pairs_per_s=2000.0, vocab_size=256, max_position_embeddings=512, poison_token_id=None, **kwargs):
        super().__init__(**kwargs)
        self.pairs_per_s = pairs_per_s
        self.poison_token_id = poison_token_id  # a batch holding this token raises (a model that fails on a pair)
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings


class SimulatedAccelerator(PreTrainedModel):
    config_class = SimulatedConfig

    def __init__(self, config):
        super().__init__(config)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        poison = self.config.poison_token_id
        if poison is not None and bool(((input_ids == poison) & (attention_mask > 0)).any()):
            raise ValueError(f"cannot score token {poison}: the simulated model fails on it")
        time.sleep(input_ids.shape[0] / self.config.pairs_per_s)
        real = input_ids.long() * attention_mask.long()
        code = (real * torch.arange(1, real.shape[1] + 1)).sum(-1) % 9973
        return SequenceClassifierOutput(logits=(code.float() / 9973.0).unsqueeze(-1) + self.bias)
'''


def simulated_scores(input_ids: list[list[int]]) -> list[float]:
    """What the simulated accelerator scores each (unpadded) row of token ids."""
    return [float(sum(t * (i + 1) for i, t in enumerate(ids)) % 9973) / 9973.0 for ids in input_ids]


def build_simulated_accelerator(
    path: str | Path, pairs_per_s: float, tokenizer_from: str | Path | None = None, poison_token_id: int | None = None
) -> Path:
    """A model folder (custom code, loaded with trust_remote_code through from_pretrained) that scores
    `pairs_per_s` pairs per second without using CPU; the tiny BERT tokenizer, or `tokenizer_from`'s."""
    import importlib.util
    import sys

    from transformers import AutoTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is None:
        _write_tokenizer(path)
    else:
        AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(path)
    import tempfile

    source = Path(tempfile.mkdtemp(prefix="rerank-sim-")) / "modeling_simulated.py"  # save_pretrained copies it
    source.write_text(_SIMULATED)
    spec = importlib.util.spec_from_file_location("modeling_simulated", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_simulated"] = module
    spec.loader.exec_module(module)
    module.SimulatedConfig.register_for_auto_class()
    module.SimulatedAccelerator.register_for_auto_class("AutoModelForSequenceClassification")
    config = module.SimulatedConfig(pairs_per_s=pairs_per_s, num_labels=1, poison_token_id=poison_token_id)
    model = module.SimulatedAccelerator(config)
    model.save_pretrained(path)
    return path
