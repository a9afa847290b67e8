"""The split Scorer: PairEncoder (tokenizer only) -> Encoded -> Scorer.score_encoded equals Scorer.score, for every
pair kind; the encoded form survives numpy / Arrow; the model side pads without a per-row loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.config import ModelConfig
from pipelines.errors import ConfigError
from pipelines.io.collections import load_cranfield
from pipelines.model.encoding import CrossEncoderPairs, Encoded, PairEncoder, PromptPairs, TextEncoder
from pipelines.model.scoring import Scorer, pad_units

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "<|im_start|>user\n<Query>: {query}\n<Document>: {text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def pairs():
    coll = load_cranfield()
    qids = sorted(coll.queries, key=int)[:8]
    docs = [d for d in sorted(coll.corpus, key=int)[:30] if coll.corpus[d].strip()]
    rng = np.random.default_rng(0)
    qs = [coll.queries[qids[i]] for i in rng.integers(0, len(qids), 40)]
    # Short to long (up to 3 abstracts): truncated pairs, pairs that fit, and many windows with chunks.
    ps = [" ".join(coll.corpus[docs[(i + j) % len(docs)]] for j in range(i % 3 + 1))[: 40 + 37 * i] for i in range(40)]
    return qs, ps


@pytest.fixture(scope="module")
def decoder_classifier(tmp_path_factory) -> str:
    from tests.tiny_models import build_decoder_classifier

    return str(build_decoder_classifier(tmp_path_factory.mktemp("models") / "dec", num_labels=2, seed=3))


@pytest.fixture(scope="module")
def causal(tmp_path_factory) -> str:
    from tests.tiny_models import build_causal_lm

    return str(build_causal_lm(tmp_path_factory.mktemp("models") / "causal", padding_side="left"))


def _same(cfg: ModelConfig, qs, ps) -> Encoded:
    """score_encoded of a separately built encoder's output equals score (to float rounding of batch shapes;
    identical here: one block, the same micro-batches)."""
    scorer = Scorer(cfg)
    want = scorer.score(qs, ps)
    windows = scorer.last_windows
    enc = PairEncoder(cfg).encode(qs, ps)
    got = scorer.score_encoded(enc)
    assert got.dtype == np.float32 and got.shape == (len(qs),)
    np.testing.assert_array_equal(got, want)
    assert scorer.last_windows == windows == enc.n_units
    assert np.ptp(got) > 1e-4
    # Through the plain-numpy form and a one-row Arrow table (what a Ray Data block can hold).
    table = pa.table({k: [v] for k, v in enc.to_arrays().items()})
    back = Encoded.from_arrays({k: np.asarray(v[0]) for k, v in table.to_pydict().items()})
    np.testing.assert_array_equal(scorer.score_encoded(back), want)
    return enc


def test_cross_encoder_with_token_types(tiny_cross_encoder, pairs):
    cfg = ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, batch_size=7, max_batch_tokens=700)
    enc = _same(cfg, *pairs)
    assert enc.types is not None and enc.types.dtype == np.int8 and set(np.unique(enc.types)) == {0, 1}
    assert enc.n_units == enc.n_pairs == len(pairs[0])


def test_cross_encoder_without_token_types(decoder_classifier, pairs):
    """A decoder classifier (no token types, no pad token saved): the encoder sets eos as pad, right padding."""
    cfg = ModelConfig(name_or_path=decoder_classifier, max_length=128, batch_size=5, activation="sigmoid")
    enc = _same(cfg, *pairs)
    assert enc.types is None and "types" not in enc.to_arrays()
    encoder = PairEncoder(cfg)
    assert isinstance(encoder, CrossEncoderPairs) and encoder.padding_side == "right"
    assert encoder.pad_token_id == encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("aggregate", ["max", "first", "mean"])
def test_long_text_chunks(tiny_cross_encoder, pairs, aggregate):
    cfg = ModelConfig(
        name_or_path=tiny_cross_encoder,
        max_length=64,
        long_text="chunks",
        chunk_stride=20,
        chunk_aggregate=aggregate,
        max_batch_tokens=500,
    )
    enc = _same(cfg, *pairs)
    assert enc.n_units > 2 * enc.n_pairs  # many windows
    # A pair's units keep their window order: its first stored unit is its first window, the truncated pair.
    trunc = PairEncoder(cfg.model_copy(update={"long_text": "truncate"})).encode(*pairs)
    first = {}
    for u, k in enumerate(enc.unit_pair.tolist()):
        first.setdefault(k, enc.input_ids[u])
    by_pair = dict(zip(trunc.unit_pair.tolist(), trunc.input_ids))
    assert all(first[k] == by_pair[k] for k in range(enc.n_pairs))


def test_causal_lm(causal, pairs):
    qs, ps = pairs
    cfg = ModelConfig(name_or_path=causal, kind="causal-lm", prompt_template=PROMPT, max_length=160, batch_size=6)
    enc = _same(cfg, qs, ps)
    assert enc.types is None
    encoder = PairEncoder(cfg)
    assert isinstance(encoder, PromptPairs) and encoder.padding_side == "left"
    chunks = cfg.model_copy(update={"long_text": "chunks", "chunk_tokens": 40, "max_windows": 3})
    assert _same(chunks, qs, ps).n_units > len(qs)


def test_units_are_sorted_longest_first_and_templates_applied(tiny_cross_encoder):
    cfg = ModelConfig(name_or_path=tiny_cross_encoder, max_length=64, query_template="q: {query}")
    encoder = PairEncoder(cfg)
    qs, ps = ["heat", "wing", "mach"], ["shock", "the boundary layer of a wing", "flow"]
    enc = encoder.encode(qs, ps)
    assert enc.ids.dtype == np.int32 and enc.offsets.dtype == np.int64 and enc.unit_pair.dtype == np.int64
    assert enc.unit_pair.tolist() == [1, 0, 2]  # longest first; "heat"/"shock" and "mach"/"flow" tie: stable
    assert np.all(np.diff(enc.lengths) <= 0) and enc.offsets[-1] == len(enc.ids)
    tok = encoder.tokenizer
    assert enc.input_ids[0] == tok("q: wing", "the boundary layer of a wing")["input_ids"]
    assert Encoded.from_arrays(enc.to_arrays()).input_ids == enc.input_ids
    with pytest.raises(ValueError, match="2 queries but 1 passages"):
        encoder.encode(["a", "b"], ["c"])
    empty = encoder.encode([], [])
    assert empty.n_pairs == 0 and Scorer(cfg).score_encoded(empty).shape == (0,)


def test_bad_lengths_fail_in_the_encoder_before_any_weights(tiny_cross_encoder, monkeypatch):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("the encoder loaded a model")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_weights)
    with pytest.raises(ConfigError, match="max_query_length"):
        PairEncoder(ModelConfig(name_or_path=tiny_cross_encoder, max_length=64, max_query_length=61))
    assert PairEncoder(ModelConfig(name_or_path=tiny_cross_encoder, max_length=64)).budget == 61


def test_bi_encoder_is_not_a_pair_encoder(tiny_bi_encoder):
    cfg = ModelConfig(name_or_path=tiny_bi_encoder, kind="bi-encoder", max_length=64)
    encoder = PairEncoder(cfg)
    assert isinstance(encoder, TextEncoder) and not encoder.encodes_pairs
    with pytest.raises(ConfigError, match="scores texts"):
        encoder.encode(["q"], ["p"])
    with pytest.raises(ConfigError, match="cross-encoder or causal-lm"):
        Scorer(cfg).score_encoded(encoder.encode_texts(["q"]))


def test_units_in_any_order_score_the_same(tiny_cross_encoder, pairs):
    """An Encoded built by hand, not length-sorted, is sorted by the model side and scored the same."""
    cfg = ModelConfig(name_or_path=tiny_cross_encoder, max_length=128)
    scorer = Scorer(cfg)
    enc = scorer.encoder.encode(*pairs)
    want = scorer.score_encoded(enc)
    perm = np.random.default_rng(1).permutation(enc.n_units)
    units = [enc.input_ids[u] for u in perm]
    types = [enc.token_type_ids[u] for u in perm]
    shuffled = Encoded(
        ids=np.concatenate([np.asarray(u, dtype=np.int32) for u in units]),
        offsets=np.concatenate([[0], np.cumsum([len(u) for u in units])]).astype(np.int64),
        types=np.concatenate([np.asarray(t, dtype=np.int8) for t in types]),
        unit_pair=enc.unit_pair[perm],
        n_pairs=enc.n_pairs,
    )
    np.testing.assert_allclose(scorer.score_encoded(shuffled), want, atol=1e-6)


def _loop_pad(units, types, pad_id, left):
    """The per-row loop the Scorer used before (reference)."""
    width = max(len(x) for x in units)
    ids = np.full((len(units), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(units), width), dtype=np.int32)
    tt = np.zeros((len(units), width), dtype=np.int32)
    for r, seq in enumerate(units):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[r, cols] = seq
        mask[r, cols] = 1
        tt[r, cols] = types[r]
    return ids, mask, tt


@pytest.mark.parametrize("left", [False, True])
def test_vectorised_padding_equals_the_row_loop(left):
    rng = np.random.default_rng(0)
    units = [rng.integers(5, 999, int(n)).tolist() for n in rng.integers(1, 40, 50)]
    types = [rng.integers(0, 2, len(u)).tolist() for u in units]
    enc = Encoded.pack(units, types, range(50), 50)
    for a, b in [(0, 50), (0, 1), (7, 19), (49, 50)]:
        got = pad_units(enc, a, b, pad_id=3, left=left, with_types=True)
        want = _loop_pad(enc.input_ids[a:b], enc.token_type_ids[a:b], 3, left)
        for g, w in zip(got, want):
            assert g.dtype == np.int32
            np.testing.assert_array_equal(g, w)
    assert pad_units(enc, 0, 5, 0, left, with_types=False)[2] is None


def test_the_encoding_module_needs_no_torch_ray_or_pydantic():
    code = (
        "import sys; import pipelines.model.encoding, pipelines.model.scoring; "
        "bad = [m for m in ('ray', 'pydantic', 'pipelines.config') if m in sys.modules]; "
        "assert not bad, bad; "
        "import pipelines.model.backends; print('ok')"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
    # encoding alone imports no torch either (a CPU stage may run where torch is not installed)
    code = "import sys, pipelines.model.encoding; assert 'torch' not in sys.modules; print('ok')"
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
