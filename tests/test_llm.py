"""Pair truncation, LLM (causal-lm) rerankers, decoder classifiers and long passages in windows, each against a
straightforward reference: one pair (or one window) at a time, no padding, built from the tokenizer and the model
directly. Tiny models are built locally (tests/tiny_models.py) and loaded through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipelines.config import ModelConfig, validate_config
from pipelines.errors import ConfigError
from pipelines.io.collections import load_cranfield
from pipelines.model.scoring import Scorer

pytestmark = pytest.mark.timeout(600)

PROMPT = (
    "<|im_start|>system\nJudge whether the Document meets the requirements. Answer yes or no.<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {text}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
INSTRUCTION = "Given a question on aerodynamics, find the abstracts that answer it"
CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(scope="module")
def cranfield():
    coll = load_cranfield()
    qids = sorted(coll.queries, key=int)[:12]
    docs = sorted(coll.corpus, key=int)[:40]
    queries = [coll.queries[q] for q in qids]
    passages = [coll.corpus[d] for d in docs if coll.corpus[d].strip()]
    return queries, passages


def _pairs(queries, passages, n, seed=0):
    rng = np.random.default_rng(seed)
    return [queries[i] for i in rng.integers(0, len(queries), n)], [
        passages[i] for i in rng.integers(0, len(passages), n)
    ]


@pytest.fixture(scope="module")
def causal_left(tmp_path_factory) -> str:
    from tests.tiny_models import build_causal_lm

    return str(build_causal_lm(tmp_path_factory.mktemp("models") / "causal-left", padding_side="left"))


@pytest.fixture(scope="module")
def causal_right(tmp_path_factory) -> str:
    from tests.tiny_models import build_causal_lm

    return str(build_causal_lm(tmp_path_factory.mktemp("models") / "causal-right", padding_side="right", seed=1))


# ---------------------------------------------------------------------------------------------- references


def _ce_reference(path: str, ids: list[list[int]], types: list[list[int]] | None) -> np.ndarray:
    """A sequence-classification model on each input alone, no padding."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for i, x in enumerate(ids):
            kw = {"input_ids": torch.tensor([x])}
            if types is not None:
                kw["token_type_ids"] = torch.tensor([types[i]])
            out.append(model(**kw).logits[0].numpy())
    return np.array(out, dtype=np.float32)


def _causal_reference(path: str, ids: list[list[int]], yes: str = "yes", no: str | None = "no") -> np.ndarray:
    """The published recipe, one prompt at a time: the last token's logit of yes, minus that of no."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    y = tok.convert_tokens_to_ids(yes)
    n = tok.convert_tokens_to_ids(no) if no else None
    out = []
    with torch.inference_mode():
        for x in ids:
            last = model(torch.tensor([x])).logits[0, -1]
            out.append(float(last[y] - last[n]) if n is not None else float(last[y]))
    return np.array(out, dtype=np.float32)


def _prompt_ids(path: str, queries, passages, template=PROMPT, instruction=INSTRUCTION) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [
        tok(template.format(query=q, text=p, instruction=instruction), add_special_tokens=False)["input_ids"]
        for q, p in zip(queries, passages)
    ]


def _causal(path: str, **extra) -> Scorer:
    cfg = {"name_or_path": path, "kind": "causal-lm", "prompt_template": PROMPT, "instruction": INSTRUCTION}
    return Scorer(ModelConfig(**(cfg | {"max_length": 512, "batch_size": 5} | extra)))


# ---------------------------------------------------------------------------------------------- truncation


def test_long_queries_that_fit_match_sentence_transformers(tiny_cross_encoder, cranfield):
    """Cranfield queries with the tiny tokenizer run to 100+ tokens: every pair that fits in max_length scores
    exactly as CrossEncoder.predict, long query or not."""
    from sentence_transformers import CrossEncoder

    queries, passages = cranfield
    scorer = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=128, batch_size=7))
    tok = scorer.tokenizer
    qs, ps = [], []
    for q in queries:
        for p in passages:
            words = p.split()[:6]  # short passages, so that long queries fit
            text = " ".join(words)
            if len(tok(q, text)["input_ids"]) <= 128:
                qs.append(q)
                ps.append(text)
    long_q = [q for q in qs if len(tok(q, add_special_tokens=False)["input_ids"]) > scorer.max_query_length]
    assert len(long_q) >= 10 and len(qs) >= 50  # the case the old rule got wrong is well represented
    ce = CrossEncoder(tiny_cross_encoder, max_length=128, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(scorer.score(qs, ps), ce.predict(list(zip(qs, ps)), batch_size=16), atol=1e-4)
    assert scorer.last_windows == len(qs)


def test_pairs_that_do_not_fit_cut_the_passage_first(tiny_cross_encoder):
    scorer = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=64, batch_size=4))
    tok = scorer.tokenizer
    budget, mql = scorer.budget, scorer.max_query_length
    assert budget == 61 and mql == 30  # [CLS] q [SEP] p [SEP]; the passage always keeps at least 31 tokens

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    short_q, long_q = "heat flow", "what is the pressure on a wing " * 12
    short_p, long_p = "shock wave", "the boundary layer of a supersonic wing " * 20
    cases = [
        (short_q, long_p, len(ids(short_q)), budget - len(ids(short_q))),  # the passage is cut, the query whole
        (long_q, long_p, mql, budget - mql),  # both long: the query keeps max_query_length
        (long_q, short_p, budget - len(ids(short_p)), len(ids(short_p))),  # query cut only as far as needed
    ]
    qs, ps = [c[0] for c in cases], [c[1] for c in cases]
    enc = scorer.encoder.encode(qs, ps)  # all three are 64 tokens: the length sort keeps their order
    want_ids, want_types = [], []
    for q, p, keep_q, keep_p in cases:
        qi, pi = ids(q)[:keep_q], ids(p)[:keep_p]
        want_ids.append([tok.cls_token_id, *qi, tok.sep_token_id, *pi, tok.sep_token_id])
        want_types.append([0] * (len(qi) + 2) + [1] * (len(pi) + 1))
    assert enc.input_ids == want_ids and enc.token_type_ids == want_types
    assert all(len(x) == 64 for x in enc.input_ids)
    got = scorer.score(qs, ps)
    np.testing.assert_allclose(got, _ce_reference(tiny_cross_encoder, want_ids, want_types)[:, 0], atol=1e-4)
    # The service refuses what would be cut (TEI/NIM without truncation) by the same rule.
    assert scorer.first_cut(short_q, [short_p, long_p]) == (1, len(ids(short_q)) + len(ids(long_p)) + 3, 64)
    assert scorer.first_cut(long_q, [short_p])[0] == -1
    assert scorer.first_cut(short_q, [short_p]) is None


def test_max_query_length_must_leave_room_for_the_passage(tiny_cross_encoder):
    with pytest.raises(ConfigError, match="max_query_length"):
        Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=64, max_query_length=61))


# ---------------------------------------------------------------------------------------------- causal-lm


@pytest.mark.parametrize("which", ["causal_left", "causal_right"])
def test_causal_lm_matches_one_prompt_at_a_time(which, request, cranfield):
    path = request.getfixturevalue(which)
    queries, passages = cranfield
    qs, ps = _pairs(queries, [" ".join(p.split()[:60]) for p in passages], 23)
    ref = _causal_reference(path, _prompt_ids(path, qs, ps))
    assert np.ptp(ref) > 1e-2
    for batch_size in (1, 4, 32):
        scorer = _causal(path, batch_size=batch_size)
        np.testing.assert_allclose(scorer.score(qs, ps), ref, atol=1e-4)
    sig = _causal(path, activation="sigmoid")
    np.testing.assert_allclose(sig.score(qs, ps), 1 / (1 + np.exp(-ref)), atol=1e-5)  # P(yes) over yes and no
    logits = sig.logits(qs, ps)
    assert logits.shape == (len(qs), 1)
    np.testing.assert_allclose(sig.from_logits(logits, "none"), ref, atol=1e-4)


def test_causal_lm_yes_only_and_other_templates(causal_left, cranfield):
    queries, passages = cranfield
    qs, ps = _pairs(queries, [" ".join(p.split()[:40]) for p in passages], 9, seed=3)
    template = "<|endoftext|>A: {query}\nB: {text}\n{instruction}"  # bge-reranker-v2-gemma's shape
    scorer = _causal(causal_left, prompt_template=template, no_token=None, yes_token="yes")
    ref = _causal_reference(causal_left, _prompt_ids(causal_left, qs, ps, template), no=None)
    np.testing.assert_allclose(scorer.score(qs, ps), ref, atol=1e-4)
    # The document before the query, no instruction.
    template = "Document: {text}\nQuery: {query}\nRelevant:"
    scorer = Scorer(ModelConfig(name_or_path=causal_left, kind="causal-lm", prompt_template=template, max_length=512))
    ref = _causal_reference(causal_left, _prompt_ids(causal_left, qs, ps, template, None))
    np.testing.assert_allclose(scorer.score(qs, ps), ref, atol=1e-4)


def test_causal_lm_cuts_only_the_document(causal_right):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(causal_right)
    scorer = _causal(causal_right, max_length=160)
    fixed = scorer.encoder.prompt.fixed_ids
    query, doc = "what is the pressure on a wing", "the boundary layer of a supersonic wing " * 40
    fits = "shock wave"
    enc = scorer.encoder.encode([query, query], [doc, fits])
    assert enc.unit_pair.tolist() == [0, 1]  # longest first
    cut, whole = enc.input_ids
    assert len(cut) == 160 and cut[: len(fixed[0])] == fixed[0] and cut[-len(fixed[2]) :] == fixed[2]
    q_ids = tok(query, add_special_tokens=False)["input_ids"]
    d_ids = tok(doc, add_special_tokens=False)["input_ids"]
    assert cut == fixed[0] + q_ids + fixed[1] + d_ids[: 160 - scorer.encoder.prompt.n_fixed - len(q_ids)] + fixed[2]
    assert whole == _prompt_ids(causal_right, [query], [fits])[0]
    np.testing.assert_allclose(
        scorer.score([query, query], [doc, fits]), _causal_reference(causal_right, [cut, whole]), atol=1e-4
    )
    with pytest.raises(ConfigError, match="leaves"):
        _causal(causal_right, max_length=64)  # the template alone takes most of it


def test_causal_lm_label_tokens_must_be_in_the_vocabulary(causal_left):
    with pytest.raises(ConfigError, match="model.yes_token 'Yes!' is not a token"):
        _causal(causal_left, yes_token="Yes!")


def test_causal_lm_config_errors():
    base = {"name_or_path": "m", "kind": "causal-lm"}
    for bad, msg in [
        ({}, "needs model.prompt_template"),
        ({"prompt_template": "{query}"}, "{text} exactly once"),
        ({"prompt_template": "{query} {text} {text}"}, "{text} exactly once"),
        ({"prompt_template": "{query} {text} {lang}"}, "unknown placeholder {lang}"),
        ({"prompt_template": "{instruction} {query} {text}"}, "set model.instruction"),
        ({"prompt_template": "{query} {text}", "instruction": "x"}, "has no {instruction}"),
        ({"prompt_template": "{query} {text", "instruction": "x"}, "not a valid format string"),
    ]:
        with pytest.raises(ConfigError, match=msg.replace("{", r"\{").replace("}", r"\}")):
            validate_config(ModelConfig, base | bad, "model")
    with pytest.raises(ConfigError, match="for cross-encoder and causal-lm models"):
        validate_config(
            ModelConfig, {"name_or_path": "m", "kind": "bi-encoder", "prompt_template": "{query}{text}"}, "model"
        )
    with pytest.raises(ConfigError, match="pads left"):
        validate_config(ModelConfig, base | {"prompt_template": "{query}{text}", "padding_side": "right"}, "model")
    with pytest.raises(ConfigError, match="chunk_stride"):
        validate_config(ModelConfig, {"name_or_path": "m", "chunk_tokens": 10, "chunk_stride": 11}, "model")


@pytest.mark.parametrize("preset", ["qwen3-reranker", "bge-reranker-v2-gemma"])
def test_presets(preset, causal_left):
    data = yaml.safe_load((CONF / "models" / f"{preset}.yaml").read_text())["model"]
    cfg = validate_config(ModelConfig, data, preset)
    assert cfg.kind == "causal-lm"
    if preset == "qwen3-reranker":  # the model card's prefix, body and suffix, joined
        prefix = (
            "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
            'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        )
        body = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {text}"
        assert cfg.prompt_template == prefix + body + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        assert (cfg.yes_token, cfg.no_token) == ("yes", "no")
        # With a tokenizer holding Qwen's chat tokens the preset scores as the recipe does.
        scorer = Scorer(cfg.model_copy(update={"name_or_path": causal_left, "dtype": "float32", "max_length": 512}))
        q, p = ["heat transfer at mach 3"], ["the heat transfer of a blunt body at mach 3"]
        ids = _prompt_ids(causal_left, q, p, cfg.prompt_template, cfg.instruction)
        assert ids[0][0] == scorer.tokenizer.convert_tokens_to_ids("<|im_start|>")  # written, not added
        np.testing.assert_allclose(
            scorer.score(q, p), 1 / (1 + np.exp(-_causal_reference(causal_left, ids))), atol=1e-5
        )
    else:
        assert cfg.prompt_template.startswith("<bos>A: {query}\nB: {text}\n") and cfg.no_token is None


# ---------------------------------------------------------------------------------------------- decoder classifiers


@pytest.mark.parametrize(("num_labels", "side"), [(1, "right"), (1, "left"), (2, "right")])
def test_decoder_classifier_without_pad_token(num_labels, side, tmp_path, cranfield):
    """A Qwen3ForSequenceClassification saved with no pad token: the Scorer sets one (eos) on the tokenizer and
    the model config, pads on the right, and scores every row at its last real token."""
    from transformers import AutoConfig, AutoTokenizer

    from tests.tiny_models import build_decoder_classifier

    path = str(build_decoder_classifier(tmp_path / "dec", num_labels=num_labels, padding_side=side, seed=num_labels))
    assert (
        AutoTokenizer.from_pretrained(path).pad_token is None and AutoConfig.from_pretrained(path).pad_token_id is None
    )
    queries, passages = cranfield
    qs, ps = _pairs(queries, [" ".join(p.split()[:50]) for p in passages], 17, seed=num_labels)
    scorer = Scorer(ModelConfig(name_or_path=path, max_length=256, batch_size=6))
    tok = AutoTokenizer.from_pretrained(path)
    ref = _ce_reference(path, [tok(q, p)["input_ids"] for q, p in zip(qs, ps)], None)
    want = ref[:, 0] if num_labels == 1 else ref[:, 1]
    np.testing.assert_allclose(scorer.score(qs, ps), want, atol=1e-4)
    assert (
        scorer.backend.hf_config.pad_token_id
        == scorer.tokenizer.pad_token_id
        == tok.convert_tokens_to_ids("<|im_end|>")
    )


# ---------------------------------------------------------------------------------------------- windows


def _window_reference(scorer: Scorer, path: str, query: str, passage: str, kind: str) -> list[float]:
    """Every window of the passage scored alone: spans of chunk_tokens (at most what fits beside the query)
    every chunk_stride tokens until the end is covered, as the README documents."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    cfg = scorer.config
    if kind == "causal":
        whole = _prompt_ids(path, [query], [passage])
        if len(whole[0]) <= scorer.max_length:
            return list(_causal_reference(path, whole))
    q = tok(query, add_special_tokens=False)["input_ids"]
    p = tok(passage, add_special_tokens=False)["input_ids"]
    q = q[: min(len(q), max(scorer.max_query_length, scorer.budget - len(p)))]
    room = scorer.budget - len(q)
    spans = [(0, min(room, len(p)))]
    if len(p) > room:
        width = min(cfg.chunk_tokens or room, room)
        stride = cfg.chunk_stride or width // 2
        spans = [(a, min(a + width, len(p))) for a in range(0, len(p), stride)]
        spans = spans[: next(i for i, (a, b) in enumerate(spans) if b == len(p)) + 1][: cfg.max_windows]
    if kind == "causal":
        f = scorer.encoder.prompt.fixed_ids
        return list(_causal_reference(path, [f[0] + q + f[1] + p[a:b] + f[2] for a, b in spans]))
    ids = [[tok.cls_token_id, *q, tok.sep_token_id, *p[a:b], tok.sep_token_id] for a, b in spans]
    types = [[0] * (len(q) + 2) + [1] * (b - a + 1) for a, b in spans]
    return list(_ce_reference(path, ids, types)[:, 0])


@pytest.mark.parametrize("aggregate", ["max", "first", "mean"])
def test_chunks_match_windows_scored_one_by_one(aggregate, tiny_cross_encoder, cranfield):
    queries, passages = cranfield
    long_passages = [" ".join(passages[i : i + 3]) for i in range(0, 15, 3)]  # 3 abstracts: many windows each
    qs = [queries[i % len(queries)] for i in range(len(long_passages))] + ["heat"]
    ps = long_passages + ["shock"]  # and one that fits: a single window
    cfg = {"name_or_path": tiny_cross_encoder, "max_length": 128, "batch_size": 8, "long_text": "chunks"}
    scorer = Scorer(ModelConfig(**cfg, chunk_aggregate=aggregate, chunk_stride=40))
    got = scorer.score(qs, ps)
    windows = [_window_reference(scorer, tiny_cross_encoder, q, p, "ce") for q, p in zip(qs, ps)]
    reduce = {"max": max, "first": lambda w: w[0], "mean": lambda w: float(np.mean(w))}[aggregate]
    np.testing.assert_allclose(got, [reduce(w) for w in windows], atol=1e-4)
    assert scorer.last_windows == sum(len(w) for w in windows) and scorer.last_windows > 3 * len(qs)
    # The first window is exactly the pair truncate scores.
    truncated = Scorer(ModelConfig(**(cfg | {"long_text": "truncate"}))).score(qs, ps)
    np.testing.assert_allclose(truncated, [w[0] for w in windows], atol=1e-4)
    # With chunks nothing of the passage is cut, so the service accepts it; only a query that would be cut is not.
    assert scorer.first_cut("heat", ps[:1]) is None
    assert scorer.first_cut(qs[0], ps[:1])[0] == -1  # this query is longer than max_query_length


def test_chunks_on_causal_lm_and_window_options(causal_left, cranfield):
    queries, passages = cranfield
    qs = queries[:3]
    ps = [" ".join(passages[i : i + 2]) for i in (0, 2, 4)]
    scorer = _causal(causal_left, max_length=200, long_text="chunks", chunk_tokens=50, chunk_stride=30, max_windows=5)
    got = scorer.score(qs, ps)
    windows = [_window_reference(scorer, causal_left, q, p, "causal") for q, p in zip(qs, ps)]
    assert [len(w) for w in windows] == [5, 5, 5]
    np.testing.assert_allclose(got, [max(w) for w in windows], atol=1e-4)
    assert scorer.last_windows == 15


# ---------------------------------------------------------------------------------------------- the batch job


def test_batch_job_scores_causal_lm_as_the_scorer_does(ray_local, causal_right, tmp_path):
    from pipelines.config import RerankJobConfig
    from pipelines.job import run_rerank
    from tests.datasets import make_pairs, write_packed

    pairs = make_pairs(num_queries=6, per_query=7)
    write_packed(pairs, tmp_path / "in")
    model = {
        "name_or_path": causal_right,
        "kind": "causal-lm",
        "prompt_template": PROMPT,
        "instruction": INSTRUCTION,
        "max_length": 256,
        "batch_size": 4,
    }
    job = validate_config(
        RerankJobConfig,
        {
            "input": {"uri": str(tmp_path / "in")},
            "output": {"uri": str(tmp_path / "out"), "top_n": 100},
            "model": model,
            "scale": {"num_actors": 1, "num_cpus_per_actor": 0.5, "batch_rows": 16},
        },
    )
    summary = run_rerank(job)
    assert summary.pairs_scored == len(pairs)
    out = pq.read_table(tmp_path / "out", columns=["query_id", "doc_id", "score"]).to_pandas()
    want = Scorer(ModelConfig(**model)).score(pairs["query"].tolist(), pairs["text"].tolist())
    expected = dict(zip(zip(pairs["query_id"], pairs["doc_id"]), want))
    got = {(q, d): s for q, d, s in out.itertuples(index=False)}
    assert set(got) == set(expected)
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-4)


def test_service_scores_causal_lm_as_the_scorer_does(ray_local, causal_left):
    """The service, unchanged, on a causal-lm: raw score = logit(yes) - logit(no), [0, 1] = P(yes); TEI without
    truncation refuses a prompt the rule would cut."""
    import requests
    from ray import serve

    from pipelines.config import ServeAppConfig
    from pipelines.serve import start_service
    from tests.ports import free_port
    from tests.test_serve import _wait_healthy

    port = free_port()
    model = {
        "name_or_path": causal_left,
        "kind": "causal-lm",
        "prompt_template": PROMPT,
        "instruction": INSTRUCTION,
        "max_length": 160,
        "batch_size": 4,
        "device": "cpu",
        "num_threads": 1,
    }
    config = validate_config(
        ServeAppConfig,
        {"model": model, "serve": {"port": port, "app_name": "rerank-llm", "num_cpus_per_replica": 0.5}},
    )
    query = "what is the heat transfer at mach 3"
    docs = ["the heat transfer of a blunt body at mach 3", "shock waves", "boundary layer " * 80]
    raw = Scorer(ModelConfig(**model)).score([query] * 3, docs)
    try:
        start_service(config)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, timeout=90)
        nim = requests.post(
            f"{url}/v1/ranking",
            json={"query": {"text": query}, "passages": [{"text": d} for d in docs], "truncate": "END"},
            timeout=60,
        ).json()
        np.testing.assert_allclose(
            [x["logit"] for x in sorted(nim["rankings"], key=lambda x: x["index"])], raw, atol=1e-4
        )
        cohere = requests.post(f"{url}/v2/rerank", json={"query": query, "documents": docs}, timeout=60).json()
        got = [x["relevance_score"] for x in sorted(cohere["results"], key=lambda x: x["index"])]
        np.testing.assert_allclose(got, 1 / (1 + np.exp(-raw)), atol=1e-5)
        tei = requests.post(f"{url}/rerank", json={"query": query, "texts": docs}, timeout=60)
        assert tei.status_code == 413 and tei.json()["field"] == "texts[2]", tei.text
        ok = requests.post(f"{url}/rerank", json={"query": query, "texts": docs[:2]}, timeout=60)
        assert ok.status_code == 200
    finally:
        serve.shutdown()
