"""Cascades in the batch job (`cascade:` instead of `model:`): the output equals the two-call reference (a stage-1
job with top_n M, then a stage-2 job over what it kept), for flat input whose queries span units and for packed
input; per-stage score columns; every stage's rejects in `_rejects/` with the stage named; per-stage counts; a
resume after the driver is killed during the last stage equals a clean run; contradictions refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.config import RerankJobConfig, validate_config
from pipelines.errors import ConfigError
from tests.datasets import make_pairs, read_output, write_flat, write_packed

KEEP, TOP_N = 5, 3


def _model(path: str) -> dict:
    return {"name_or_path": path, "max_length": 96, "batch_size": 8}


def cascade_config(
    tmp_path: Path, src: Path, small: str, big: str, out: str = "out", big_extra: dict | None = None, **scale
) -> RerankJobConfig:
    return validate_config(
        RerankJobConfig,
        {
            "input": {"uri": str(src), "max_text_bytes": 300},
            "output": {"uri": str(tmp_path / out), "top_n": TOP_N},
            "cascade": [
                {"name": "small", "model": _model(small), "keep": KEEP},
                {
                    "name": "big",
                    "model": _model(big) | (big_extra or {}),
                    "scale": {"num_actors": 1, "num_cpus_per_actor": 0.5},
                },
            ],
            "scale": {"num_actors": 1, "num_cpus_per_actor": 0.5, "batch_rows": 16, "unit_rows": 7} | scale,
        },
    )


def single_config(tmp_path: Path, src: Path, model: str, out: str, top_n: int) -> RerankJobConfig:
    return validate_config(
        RerankJobConfig,
        {
            "input": {"uri": str(src), "max_text_bytes": 300},
            "output": {"uri": str(tmp_path / out), "top_n": top_n},
            "model": _model(model),
            "scale": {"num_actors": 1, "num_cpus_per_actor": 0.5, "batch_rows": 16, "unit_rows": 7},
        },
    )


def two_calls(
    tmp_path: Path, pairs: pd.DataFrame, src: Path, small: str, big: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reference: stage 1 as a job of its own (top_n KEEP), then stage 2 as a job over the pairs it kept."""
    from pipelines.job import run_rerank

    run_rerank(single_config(tmp_path, src, small, "ref1", KEEP))
    first = read_output(tmp_path / "ref1")
    kept = pairs.merge(first[["query_id", "doc_id"]], on=["query_id", "doc_id"])
    write_flat(kept, tmp_path / "ref2_in", files=2)
    run_rerank(single_config(tmp_path, tmp_path / "ref2_in", big, "ref2", TOP_N))
    return first, read_output(tmp_path / "ref2")


def with_rejects(pairs: pd.DataFrame) -> pd.DataFrame:
    """Two pairs the first stage rejects (text over input.max_text_bytes 300)."""
    bad = pairs.iloc[:2].copy()
    bad["doc_id"] = [990_001, 990_002]
    bad["text"] = "x " * 200
    return pd.concat([pairs, bad], ignore_index=True)


@pytest.mark.parametrize("layout", ["flat", "packed"])
def test_cascade_equals_two_calls(tmp_path, ray_local, tiny_cross_encoder, tiny_cross_encoder_2labels, layout):
    from pipelines.job import run_rerank

    pairs = with_rejects(make_pairs(num_queries=10, per_query=9, seed=3))
    write = write_flat if layout == "flat" else write_packed
    src = write(pairs, tmp_path / "in", files=3 if layout == "flat" else 2)
    summary = run_rerank(cascade_config(tmp_path, src, tiny_cross_encoder, tiny_cross_encoder_2labels))

    first, ref = two_calls(tmp_path, pairs, src, tiny_cross_encoder, tiny_cross_encoder_2labels)
    got = read_output(tmp_path / "out")
    assert list(got.columns) == ["query_id", "doc_id", "rank", "score", "first_stage_rank", "score_small", "score_big"]
    cols = ["query_id", "doc_id", "rank", "first_stage_rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-4)  # batches differ: float noise only
    np.testing.assert_array_equal(got["score_big"].to_numpy(), got["score"].to_numpy())
    small = got.merge(first[["query_id", "doc_id", "score"]], on=["query_id", "doc_id"], suffixes=("", "_ref"))
    assert len(small) == len(got)
    np.testing.assert_allclose(small["score_small"], small["score_ref"], atol=1e-4)

    # Counts per stage chain: what stage 1 kept is what stage 2 got; every input pair accounted for.
    written = json.loads((tmp_path / "out" / "_summary.json").read_text())
    stages = written["stages"]
    assert [s["name"] for s in stages] == ["small", "big"]
    assert stages[0]["pairs_in"] == len(pairs) and stages[0]["rejected"] == 2
    assert stages[0]["pairs_scored"] == len(pairs) - 2 and stages[0]["rows_kept"] == len(first)
    assert stages[1]["pairs_in"] == stages[1]["pairs_scored"] == len(first) and stages[1]["rows_kept"] == len(got)
    assert written["pairs_in"] == len(pairs) and written["pairs_scored"] == len(pairs) - 2 + len(first)
    assert summary.stages == stages and "stages: small" in summary.one_line()
    assert list(written["fingerprint"]["cascade"]) == ["1-small", "2-big"]

    # Rejects of every stage, with the stage named; the work folder (the earlier stages' jobs) is gone.
    rejects = pq.read_table(tmp_path / "out" / "_rejects").to_pandas()
    assert sorted(rejects["doc_id"]) == [990_001, 990_002]
    assert set(rejects["stage"]) == {"small"} and set(rejects["reason"]) == {"text_too_long"}
    assert (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out" / "_work").exists()
    assert set(written["result_files"]) == {
        str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.parquet")
    }

    # A resume of the finished cascade does nothing; one with another keep is refused, naming it.
    from pipelines.errors import OutputError

    with pytest.raises(OutputError, match="already holds a finished job"):
        run_rerank(cascade_config(tmp_path, src, tiny_cross_encoder, tiny_cross_encoder_2labels))
    changed = cascade_config(tmp_path, src, tiny_cross_encoder, tiny_cross_encoder_2labels)
    changed.output.mode = "resume"
    assert run_rerank(changed).stages == stages  # unchanged: already complete
    data = changed.model_dump(mode="json")
    data["cascade"][0]["keep"] = 4
    with pytest.raises(OutputError, match=r"cascade.1-small.keep: 5 \(recorded\) vs 4 \(now\)"):
        run_rerank(validate_config(RerankJobConfig, data))


def test_cascade_contradictions_refused_in_one_line(tmp_path, tiny_cross_encoder):
    base = {"input": {"uri": "in"}, "output": {"uri": "out", "top_n": 10}}
    m = _model(tiny_cross_encoder)
    cases = [
        ({"cascade": [{"model": m, "keep": 5}, {"model": m}]}, "output.top_n 10 is more than the 5 candidates"),
        ({"cascade": [{"model": m, "keep": 20}, {"model": m, "keep": 30}, {"model": m}]}, "keeps 30, more than the 20"),
        ({"cascade": [{"model": m}, {"model": m}]}, "stage 1 (stage1) needs keep"),
        ({"cascade": [{"model": m, "keep": 20}, {"model": m, "keep": 10}]}, "the last stage (stage2) takes no keep"),
        ({"cascade": [{"name": "a", "model": m, "keep": 20}, {"name": "a", "model": m}]}, "'a' is used twice"),
        ({"cascade": [{"reranker": "x", "keep": 20}, {"model": m}]}, "rerank run has no rerankers list"),
        ({"cascade": [{"model": m, "keep": 20}, {"model": m}], "model": m}, "give the reranker as model, or several"),
        ({"cascade": [{"model": m, "reranker": "x", "keep": 20}, {"model": m}]}, "gives its model, or names"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError) as err:
            validate_config(RerankJobConfig, base | extra)
        assert message in str(err.value) and "\n" not in str(err.value).strip(), str(err.value)


def test_cascade_model_checked_before_ray(tmp_path, tiny_cross_encoder):
    """A stage's model that cannot load is refused by the plan, naming the stage, before any Ray work."""
    from pipelines.job.cascade import plan_cascade

    src = write_flat(make_pairs(num_queries=3, per_query=4), tmp_path / "in", files=1)
    config = validate_config(
        RerankJobConfig,
        {
            "input": {"uri": str(src)},
            "output": {"uri": str(tmp_path / "out"), "top_n": 2},
            "cascade": [
                {"name": "small", "model": _model(tiny_cross_encoder), "keep": 3},
                {"name": "big", "model": _model(str(tmp_path / "no-such-model"))},
            ],
        },
    )
    with pytest.raises(Exception, match="cascade stage big"):
        plan_cascade(config, on_cluster=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_driver_killed_in_the_last_stage_then_resumed(tmp_path, tiny_cross_encoder, ray_tmp):
    from tests.tiny_models import build_simulated_accelerator

    pairs = make_pairs(num_queries=24, per_query=9, seed=11)
    src = write_flat(pairs, tmp_path / "in", files=3)
    # The last stage at 20 pairs/s (no CPU): its 40 units take seconds, so the driver is killed mid-stage.
    slow = str(build_simulated_accelerator(tmp_path / "slow", pairs_per_s=20.0))
    config = cascade_config(tmp_path, src, tiny_cross_encoder, slow, big_extra={"trust_remote_code": True}, unit_rows=3)
    data = config.model_dump(mode="json", exclude_unset=True) | {"ray": {"num_cpus": 3}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    done = out / "_work" / "done"  # the last stage's commits: it writes the output itself
    manifest = out / "_work" / "manifest.json"  # the last stage's units planned: its job has started
    deadline = time.monotonic() + 300
    while driver.poll() is None and time.monotonic() < deadline:
        if manifest.exists() and json.loads(manifest.read_text()).get("units"):
            time.sleep(2.0)  # into the stage's 6 s of scoring (120 pairs at 20 pairs/s)
            os.killpg(driver.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read()[-3000:]
    assert not (out / "_SUCCESS").exists() and (out / "_work" / "stages" / "01-small" / "_SUCCESS").exists()
    stage1 = json.loads((out / "_work" / "stages" / "01-small" / "_summary.json").read_text())
    stage2_units = len(json.loads((out / "_work" / "manifest.json").read_text())["units"])
    done_before = len(list(done.glob("*.json")))
    assert done_before < stage2_units

    resumed = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(path), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["stages"][0]["wall_time_s"] == stage1["wall_time_s"]  # stage 1 found finished, not rerun
    assert summary["stages"][1]["units_resumed"] >= done_before

    clean = tmp_path / "clean.yaml"
    clean.write_text(yaml.safe_dump(data | {"output": data["output"] | {"uri": str(tmp_path / "clean")}}))
    fresh = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(clean)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    pd.testing.assert_frame_equal(read_output(out), read_output(tmp_path / "clean"))
    assert summary["pairs_scored"] == json.loads((tmp_path / "clean" / "_summary.json").read_text())["pairs_scored"]


def _model_actor_pids() -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("ModelStage" in part for part in (p.info["cmdline"] or []))
    ]


def _kill_after(done_dir: Path, commits: int, thread, deadline: float) -> int | None:
    """SIGKILL the model actor of a stage once it committed `commits` units there (it holds units in flight)."""
    while thread.is_alive() and time.monotonic() < deadline:
        records = [json.loads(p.read_text()) for p in done_dir.glob("*.json")] if done_dir.exists() else []
        if len(records) >= commits and records[-1]["pid"] in _model_actor_pids():
            os.kill(records[-1]["pid"], signal.SIGKILL)
            return records[-1]["pid"]
        time.sleep(0.02)
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_actor_killed_in_each_stage(tmp_path, ray_local, tiny_cross_encoder, tiny_cross_encoder_2labels):
    """A model actor SIGKILLed in stage 1 and another in stage 2: the output is the reference's, counts once."""
    import threading

    from pipelines.config import ModelConfig
    from pipelines.job import run_rerank
    from pipelines.model.scoring import Scorer
    from tests.datasets import reference_top_n

    pairs = make_pairs(num_queries=30, per_query=9, seed=7)
    src = write_flat(pairs, tmp_path / "in", files=3)
    config = cascade_config(tmp_path, src, tiny_cross_encoder, tiny_cross_encoder_2labels, unit_rows=4)
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_rerank(config)
        except BaseException as err:  # noqa: BLE001 - reported below
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    first = _kill_after(tmp_path / "out" / "_work" / "stages" / "01-small" / "_work" / "done", 4, thread, deadline)
    second = _kill_after(tmp_path / "out" / "_work" / "done", 4, thread, deadline)
    thread.join(timeout=300)
    assert first is not None and second is not None, "the cascade ended before an actor of each stage was killed"
    assert "error" not in result, result.get("error")

    def scores(path: str, df: pd.DataFrame) -> np.ndarray:
        return Scorer(ModelConfig(name_or_path=path, max_length=96)).score(df["query"].tolist(), df["text"].tolist())

    kept = reference_top_n(pairs, scores(tiny_cross_encoder, pairs), KEEP)
    second_in = pairs.merge(kept[["query_id", "doc_id"]], on=["query_id", "doc_id"])
    ref = reference_top_n(second_in, scores(tiny_cross_encoder_2labels, second_in), TOP_N)
    got = read_output(tmp_path / "out")
    cols = ["query_id", "doc_id", "rank", "first_stage_rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-4)
    stages = result["summary"].stages
    assert stages[0]["pairs_scored"] == len(pairs) and stages[1]["pairs_scored"] == len(second_in)
