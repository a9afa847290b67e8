"""A pair the model raises on (a poison pair) is isolated and rejected as model_error with its error; the job and
rerank_dataset go on. A model that fails on every pair (a broken one) still fails at once, with its own message."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ModelConfig
from pipelines.engine.model_stage import ERRORS, SCORES, ModelError, ModelStage, encode_pairs
from tests.datasets import make_pairs, read_output, reference_top_n, small_job, write_flat

pytestmark = pytest.mark.timeout(300)

POISON_WORD = "supersonic"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.tiny_models import build_simulated_accelerator

    root = tmp_path_factory.mktemp("poison")
    clean = build_simulated_accelerator(root / "clean", pairs_per_s=1e6)
    poison_id = AutoTokenizer.from_pretrained(str(clean)).convert_tokens_to_ids(POISON_WORD)
    cls_id = AutoTokenizer.from_pretrained(str(clean)).cls_token_id
    poison = build_simulated_accelerator(root / "poison", pairs_per_s=1e6, poison_token_id=poison_id)
    broken = build_simulated_accelerator(root / "broken", pairs_per_s=1e6, poison_token_id=cls_id)
    return {"clean": str(clean), "poison": str(poison), "broken": str(broken)}


def _config(path: str) -> ModelConfig:
    return ModelConfig(name_or_path=path, trust_remote_code=True, max_length=96, batch_size=4)


def _row(model: ModelConfig, queries: list[str], texts: list[str]) -> pa.Table:
    cols = encode_pairs(model, queries, texts)
    cols["uid"] = b"part-0.parquet:0-10"
    return pa.table({k: pa.array([v], pa.large_binary()) for k, v in cols.items()})


def test_the_model_stage_isolates_poison_pairs(models):
    queries = ["heat transfer"] * 10
    texts = [f"the flow of the wing {'supersonic ' if i in (3, 7) else ''}boundary layer {i}" for i in range(10)]
    clean = ModelStage(_config(models["clean"]))
    stage = ModelStage(_config(models["poison"]))
    want = np.frombuffer(clean(_row(clean.scorer.config, queries, texts)).column(SCORES)[0].as_py(), np.float32)
    out = stage(_row(stage.scorer.config, queries, texts))
    got = np.frombuffer(out.column(SCORES)[0].as_py(), np.float32)
    failed = json.loads(out.column(ERRORS)[0].as_py())
    assert [i for i, _ in failed] == [3, 7]
    assert all(line.startswith("ValueError: cannot score token") for _, line in failed)
    assert np.isnan(got[[3, 7]]).all()
    keep = [i for i in range(10) if i not in (3, 7)]
    np.testing.assert_array_equal(got[keep], want[keep])  # the others scored exactly as a clean model does
    assert stage.scorer.last_windows == 8


def test_a_broken_model_fails_at_once_with_its_own_message(models):
    stage = ModelStage(_config(models["broken"]))
    queries, texts = ["heat"] * 20, [f"wing {i}" for i in range(20)]
    with pytest.raises(ModelError, match=r"fails on every pair it is given .*ValueError: cannot score token"):
        stage(_row(stage.scorer.config, queries, texts))
    assert "\n" not in str(ModelError("x"))
    # Not isolating (rerank_dataset's default): the first error, at once.
    strict = ModelStage(_config(models["poison"]), isolate_errors=False)
    with pytest.raises(ModelError, match="the model failed of unit .*: ValueError"):
        strict(_row(strict.scorer.config, ["q"], [POISON_WORD]))


def test_encoded_subset_keeps_units_and_renumbers_pairs(models):
    from pipelines.model.encoding import Encoded

    model = _config(models["clean"]).model_copy(update={"long_text": "chunks", "chunk_tokens": 8, "max_length": 24})
    row = encode_pairs(model, ["q a", "q b", "q c"], ["flow " * 30, "wing", "shock wave " * 10])
    enc = Encoded.from_arrays(pickle.loads(row["_encoded"]))
    sub = enc.subset(np.array([0, 2]))
    assert sub.n_pairs == 2
    assert sub.n_units == int(np.isin(enc.unit_pair, [0, 2]).sum())
    assert sorted(set(sub.unit_pair.tolist())) == [0, 1]
    assert list(sub.lengths) == sorted(sub.lengths, reverse=True)
    whole = {p: [u for u, q in zip(enc.input_ids, enc.unit_pair) if q == p] for p in (0, 2)}
    assert [u for u, q in zip(sub.input_ids, sub.unit_pair) if q == 0] == whole[0]
    assert [u for u, q in zip(sub.input_ids, sub.unit_pair) if q == 1] == whole[2]


@pytest.mark.slow
def test_a_poison_pair_is_rejected_and_the_job_goes_on(ray_local, tmp_path, models):
    from pipelines.job import run_rerank
    from pipelines.scoring import Scorer

    df = make_pairs(num_queries=10, per_query=8, seed=3)
    df.loc[df.index % 9 == 4, "text"] += " " + POISON_WORD  # about one pair in nine fails
    df["text"] = df["text"].str.replace(POISON_WORD, "wave").where(df.index % 9 != 4, df["text"])
    df["query"] = df["query"].str.replace(POISON_WORD, "wave")
    poisoned = df["text"].str.contains(POISON_WORD)
    assert 0 < poisoned.sum() < len(df)
    inp = write_flat(df, tmp_path / "in", files=2)
    config = small_job(tmp_path, models["poison"], inp, top_n=3, model__trust_remote_code=True)
    summary = run_rerank(config)
    assert summary.rejected_by_reason == {"model_error": int(poisoned.sum())}
    assert summary.pairs_in == len(df) and summary.pairs_scored == len(df) - poisoned.sum()
    rejects = pq.read_table(tmp_path / "out" / "_rejects").to_pandas()
    assert set(rejects["reason"]) == {"model_error"}
    assert sorted(rejects["doc_id"]) == sorted(df.loc[poisoned, "doc_id"])
    assert rejects["detail"].str.startswith("ValueError: cannot score token").all()
    done = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert done["rejected_by_reason"] == {"model_error": int(poisoned.sum())}
    # The rest ranked exactly as a clean model ranks them (the simulated model's scores do not depend on it).
    clean = df[~poisoned].reset_index(drop=True)
    scores = Scorer(_config(models["clean"])).score(clean["query"].tolist(), clean["text"].tolist())
    want = reference_top_n(clean, scores, 3)
    got = read_output(tmp_path / "out")
    pd.testing.assert_frame_equal(
        got[["query_id", "doc_id", "rank"]], want[["query_id", "doc_id", "rank"]], check_dtype=False
    )


@pytest.mark.slow
def test_a_broken_model_fails_the_job_in_one_line(ray_local, tmp_path, models):
    from pipelines.errors import RerankError
    from pipelines.job import run_rerank

    inp = write_flat(make_pairs(num_queries=6, per_query=6, seed=4), tmp_path / "in", files=1)
    config = small_job(tmp_path, models["broken"], inp, top_n=3, model__trust_remote_code=True)
    with pytest.raises(RerankError) as err:
        run_rerank(config)
    assert "fails on every pair it is given" in str(err.value) and "ValueError: cannot score token" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_rerank_dataset_puts_model_errors_in_a_column(ray_local, models):
    from pipelines.dataset import rerank_dataset

    ds = ray_local.data.from_items(
        [{"query": "heat", "text": f"wing {POISON_WORD if i == 2 else 'flow'} {i}"} for i in range(6)]
    )
    rows = rerank_dataset(ds, _config(models["poison"]), on_model_error="column").take_all()
    rows.sort(key=lambda r: r["text"])
    bad = [r for r in rows if r["error"] is not None]
    assert len(bad) == 1 and POISON_WORD in bad[0]["text"] and np.isnan(bad[0]["score"])
    assert all(np.isfinite(r["score"]) for r in rows if r["error"] is None)
    with pytest.raises(Exception, match="the model failed.*ValueError: cannot score token"):
        rerank_dataset(ds, _config(models["poison"])).take_all()
