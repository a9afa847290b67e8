"""Issue 23 case 8, the batch job's messages: each says what happened, in one line, and settings that cannot change
a score do not block a resume.

- a model that hangs is not blamed on the cluster (the stall names the live model actors);
- a finished job whose result file was deleted is not "already complete" (the summary lists its files);
- a resumed job's summary records the unit size its units really have (the manifest's);
- model.batch_size, model.cache_dir & co. may change on a resume; max_length may not;
- a damaged input mid-job ends `rerank run` in one line, without Ray's tracebacks (a real process);
- the progress line comes every EVERY_S while a slow first unit is scored, not only when a unit commits;
- a run whose output was taken over says so when it stops.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.errors import OutputError
from pipelines.job import JobError, hold_output, plan_rerank, run_rerank
from tests.datasets import make_pairs, small_job, write_flat

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
TOP_N = 3


@pytest.fixture(scope="module")
def pairs() -> pd.DataFrame:
    return make_pairs(num_queries=10, per_query=7, seed=5)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Models that score at a set pace without using CPU: a slow one and one that never finishes a batch."""
    from tests.tiny_models import build_simulated_accelerator

    root = tmp_path_factory.mktemp("simulated")
    return {
        "slow": str(build_simulated_accelerator(root / "slow", pairs_per_s=8.0)),
        "hangs": str(build_simulated_accelerator(root / "hangs", pairs_per_s=1e-4)),
    }


def job(tmp_path, model, src, **extra):
    return small_job(tmp_path, model, src, TOP_N, **extra)


# ---------------------------------------------------------------------------- a model that hangs


def test_a_hanging_model_is_not_blamed_on_the_cluster(ray_local, tmp_path, simulated, pairs):
    """The model actor is up and never finishes a batch: after scale.stall_timeout_s the line says that no unit
    finished while the model actors were alive, and what to change; not that the cluster lacks a CPU."""
    src = write_flat(pairs, tmp_path / "in", files=1)
    config = job(
        tmp_path,
        simulated["hangs"],
        src,
        model__trust_remote_code=True,
        scale__num_actors=1,
        scale__unit_rows=20,
        scale__stall_timeout_s=6,
    )
    with pytest.raises(JobError) as err:
        run_rerank(config)
    line = str(err.value)
    assert "\n" not in line
    assert re.search(r"no unit finished for 6 s while the model actors were alive \(1 up\)", line), line
    assert "scale.stall_timeout_s" in line and "scale.unit_rows" in line and "--resume" in line, line
    assert "lacks" not in line, line


def test_a_stall_with_no_model_actor_alive_leads_with_what_the_cluster_lacks():
    from ray.data.exceptions import ExecutionTimeoutError

    from pipelines.job.run import _scoring_failure

    config = small_job(Path("/tmp"), "m", "/tmp/in", TOP_N, scale__stall_timeout_s=60)
    scale = {"num_cpus_per_actor": 1.0, "num_gpus_per_actor": 0.0, "actor_resources": {}, "accelerator_type": None}
    stall = ExecutionTimeoutError("Dataset execution made no progress for at least 60s")
    gone = _scoring_failure(stall, config, scale, 1, 4, alive=0)
    assert gone.startswith("no unit moved for 60 s (scale.stall_timeout_s): the model actors are gone"), gone
    assert "the cluster lacks 1 CPU / 0 GPU per model actor" in gone and "hangs" not in gone, gone
    unknown = _scoring_failure(stall, config, scale, 1, 4, alive=None)  # not seen: both causes, the hang first
    assert unknown.index("hangs") < unknown.index("lacks"), unknown
    alive = _scoring_failure(stall, config, scale, 1, 4, alive=2)
    assert "while the model actors were alive (2 up)" in alive and "lacks" not in alive, alive


# ---------------------------------------------------------------------------- a deleted result file


def test_a_finished_job_with_a_missing_result_file_is_not_already_complete(ray_local, tmp_path, tiny_cross_encoder):
    """_summary.json lists every published file with its bytes; a resume of the finished job checks them and
    refuses, in one line naming the file, when one is gone or changed (it used to say "nothing to do")."""
    data = make_pairs(num_queries=10, per_query=7, seed=5)
    data = pd.concat([data, data.head(2)])  # two rejects (duplicates): a _rejects/ file is published too
    src = write_flat(data, tmp_path / "in", files=2)
    run_rerank(job(tmp_path, tiny_cross_encoder, src, scale__num_actors=1))
    out = tmp_path / "out"
    summary = json.loads((out / "_summary.json").read_text())
    published = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert sorted(summary["result_files"]) == published and any(p.startswith("_rejects/") for p in published)
    assert all(summary["result_files"][p] == (out / p).stat().st_size for p in published)

    resume = job(tmp_path, tiny_cross_encoder, src, output__mode="resume")
    assert plan_rerank(resume).already_complete  # all there: nothing to do
    part = next(p for p in published if p.startswith("part-"))
    kept = (out / part).read_bytes()
    (out / part).unlink()
    with pytest.raises(OutputError, match=rf"{re.escape(part)} is missing; rerun with output.mode=overwrite") as err:
        run_rerank(resume)
    assert "\n" not in str(err.value)
    (out / part).write_bytes(kept + b"x")
    with pytest.raises(OutputError, match=rf"{re.escape(part)} has [\d,]+ bytes, [\d,]+ recorded"):
        plan_rerank(resume)
    (out / part).write_bytes(kept)
    assert plan_rerank(resume).already_complete


# ---------------------------------------------------------------------------- unit_rows on a resume


def test_a_resumed_job_records_the_unit_size_of_its_units(ray_local, tmp_path, tiny_cross_encoder, pairs, monkeypatch):
    """A run cut into units of 6 pairs is stopped after its first commit came back; the resume sets unit_rows 50,
    which does not re-cut the units: the summary records 6 (config and scale), and the 50 beside it."""
    from pipelines.engine.ray_runtime import Stopped
    from pipelines.job.run import _ProgressLine

    src = write_flat(pairs, tmp_path / "in", files=2)
    real_show = _ProgressLine.show

    def stop_after_first(self, now, units, pairs_done, last=False):
        real_show(self, now, units, pairs_done, last)
        if units:
            raise Stopped(signal.SIGINT)

    monkeypatch.setattr(_ProgressLine, "show", stop_after_first)
    with pytest.raises(Stopped):
        run_rerank(job(tmp_path, tiny_cross_encoder, src, scale__num_actors=1, scale__unit_rows=6))
    monkeypatch.setattr(_ProgressLine, "show", real_show)
    gc.collect()  # the abandoned pipeline's executor stops its actors
    manifest = json.loads((tmp_path / "out" / "_work" / "manifest.json").read_text())
    assert manifest["unit_rows"] == 6
    done = len(list((tmp_path / "out" / "_work" / "done").glob("*.json")))
    assert 0 < done <= len(manifest["units"])  # units commit before their records reach the driver: maybe all

    summary = run_rerank(
        job(tmp_path, tiny_cross_encoder, src, output__mode="resume", scale__num_actors=1, scale__unit_rows=50)
    )
    recorded = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary.units == len(manifest["units"]) and summary.units_resumed >= done
    assert recorded["config"]["scale"]["unit_rows"] == 6, recorded["config"]["scale"]
    assert recorded["scale"]["unit_rows"] == 6 and recorded["scale"]["unit_rows_set_now"] == 50, recorded["scale"]
    assert recorded["pairs_in"] == recorded["pairs_scored"] == len(pairs)


# ---------------------------------------------------------------------------- settings that cannot change a score


def test_settings_that_cannot_change_a_score_do_not_block_a_resume(tmp_path, tiny_cross_encoder, pairs):
    src = write_flat(pairs, tmp_path / "in", files=2)
    plan = plan_rerank(job(tmp_path, tiny_cross_encoder, src))
    # What an interrupted run leaves behind (units not planned yet).
    plan.progress.write_manifest({"version": 2, "fingerprint": plan.fingerprint, "join_partitions": 2, "units": None})
    neutral = {
        "model__batch_size": 64,
        "model__max_batch_tokens": 4096,
        "model__cache_dir": str(tmp_path / "elsewhere"),
        "model__num_threads": 1,
        "model__embedding_cache": 10,
        "scale__unit_rows": 5,
        "scale__num_cpus_per_actor": 1.0,
        "scale__stall_timeout_s": 60,
    }
    plan_rerank(job(tmp_path, tiny_cross_encoder, src, output__mode="resume", **neutral))  # accepted
    for key, value, says in (
        ("model__max_length", 64, r"model.max_length: 96 \(recorded\) vs 64 \(now\)"),
        ("model__activation", "sigmoid", r"model.activation: 'none' \(recorded\) vs 'sigmoid' \(now\)"),
        ("model__passage_template", "passage: {text}", r"model.passage_template"),
        ("output__top_n", 5, r"output.top_n: 3 \(recorded\) vs 5 \(now\)"),
    ):
        with pytest.raises(OutputError, match=says):
            plan_rerank(job(tmp_path, tiny_cross_encoder, src, output__mode="resume", **{key: value}))
    # A record written before the rule (it holds model.batch_size and model.cache_dir) is compared the same way.
    older = json.loads(json.dumps(plan.fingerprint))
    older["model"] |= {"batch_size": 8, "cache_dir": None, "max_batch_tokens": "auto"}
    plan.progress.write_manifest({"version": 2, "fingerprint": older, "join_partitions": 2, "units": None})
    plan_rerank(job(tmp_path, tiny_cross_encoder, src, output__mode="resume", **neutral))


# ---------------------------------------------------------------------------- the terminal of a failed job


def damage_pages(path: Path, from_fraction: float) -> None:
    """Scramble the data pages of a Parquet file from `from_fraction` of them on (the footer stays readable, so
    the plan accepts the file and the job fails on the row groups behind it)."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    end = len(data) - footer - 8
    for i in range(int(end * from_fraction), end, 7):
        data[i] = (data[i] + 111) % 256
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_damaged_input_mid_job_ends_in_one_line_without_ray_tracebacks(tmp_path, tiny_cross_encoder, ray_tmp):
    """`rerank run` on a file whose later row groups are damaged: units of the good file commit, then a read
    fails. stderr holds no traceback (Ray Data's stack of the failed task goes to its log file), ends with the
    one line naming the file and rows, and has only a few lines besides the job's own log lines."""
    data = make_pairs(num_queries=40, per_query=9, seed=3)
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pandas(data.iloc[:150], preserve_index=False), src / "a.parquet")
    pq.write_table(pa.Table.from_pandas(data.iloc[150:], preserve_index=False), src / "b.parquet", row_group_size=20)
    damage_pages(src / "b.parquet", 0.5)
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"uri": str(src)},
                "output": {"uri": str(tmp_path / "out"), "top_n": TOP_N},
                "model": {"name_or_path": tiny_cross_encoder, "max_length": 96, "batch_size": 8},
                "scale": {"num_actors": 1, "num_cpus_per_actor": 1, "unit_rows": 20},
                "ray": {"num_cpus": 3},
            }
        )
    )
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = str(ROOT)
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert re.fullmatch(r"rerank: error: cannot read rows \d+-\d+ of .*b\.parquet: .+", lines[-1]), lines[-1]
    assert not [ln for ln in lines if "Traceback" in ln or ln.lstrip().startswith('File "')], run.stderr[-4000:]
    assert not [ln for ln in lines if " ERROR " in ln or "Exception occurred" in ln], run.stderr[-4000:]
    # Besides the job's own log lines (the plan, the progress line every 5 s, where Ray Data's log is): the error
    # line and what Ray prints as it starts (a token notice, the model actor's own output).
    others = [ln for ln in lines if " INFO pipelines." not in ln]
    assert len(others) < 10, "\n".join(others)
    assert any("Ray Data's full log of this run:" in ln for ln in lines), run.stderr[-3000:]


# ---------------------------------------------------------------------------- progress while a unit is scored


def test_the_progress_line_comes_while_the_first_unit_is_scored(ray_local, tmp_path, simulated, pairs, monkeypatch):
    """A model that scores 8 pairs/s: the first unit of 20 pairs takes 2.5 s, five progress periods of 0.5 s.
    Lines come every period before any unit commits (they used to come only when a unit's commit came back),
    and say where the work is."""
    from pipelines.job.run import _ProgressLine

    monkeypatch.setattr(_ProgressLine, "EVERY_S", 0.5)
    src = write_flat(pairs.head(40), tmp_path / "in", files=1)
    config = job(
        tmp_path,
        simulated["slow"],
        src,
        model__trust_remote_code=True,
        scale__num_actors=1,
        scale__unit_rows=20,
    )
    progress: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: progress.append(record.getMessage()) if " units" in record.getMessage() else None
    logger = logging.getLogger("pipelines.job.run")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run_rerank(config)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    print("\n".join(progress))
    committed = (i for i, m in enumerate(progress) if re.match(r"rerank: [1-9]\d* of \d+ units", m))
    first_commit = next(committed, len(progress))
    before = progress[:first_commit]
    waiting = [m for m in before if "no unit committed yet" in m]
    assert len(waiting) >= 2, progress
    # Where the work is, while the actor scores (Ray Data's executor, read in the driver): not only as it starts.
    assert any(re.search(r"in (read \d+ at work, )?model 1 at work.*; model actors: \d+ up", m) for m in waiting), waiting


# ---------------------------------------------------------------------------- the stop line of a displaced run


def plant_lease(out: Path) -> None:
    (out / "_work").mkdir(parents=True, exist_ok=True)
    (out / "_work" / "lease.json").write_text(
        json.dumps(
            {
                "host": "another-host.example",
                "pid": 4242,
                "started_at": "2026-01-01T00:00:00+00:00",
                "token": "theirs",
                "renewed_at": time.time(),
                "timeout_s": 600.0,
            }
        )
    )


def test_the_stop_line_of_a_run_whose_output_was_taken_over_says_so(tmp_path, tiny_cross_encoder, pairs):
    from pipelines.cli import _stopped_at

    src = write_flat(pairs, tmp_path / "in", files=1)
    plan = plan_rerank(job(tmp_path, tiny_cross_encoder, src))
    lease = hold_output(plan)
    plan.progress.write_manifest({"version": 2, "fingerprint": plan.fingerprint, "join_partitions": 1, "units": None})
    plant_lease(tmp_path / "out")  # another run took the folder over
    lease.release()
    line = _stopped_at(plan)
    assert line.startswith("stopped: the output was taken over by another run (host another-host.example, pid 4242"), (
        line
    )
    assert "rerun with --resume once it has stopped" in line and "\n" not in line
    # A run that kept its lease: how far it got, and the resume hint.
    other = tmp_path / "other"
    plan = plan_rerank(job(other, tiny_cross_encoder, src))
    hold_output(plan).release()
    assert _stopped_at(plan) == "stopped before any unit was scored; rerun with --resume to finish"
