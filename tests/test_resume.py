"""The driver killed mid-job, then `rerank run --resume`: only unfinished units are redone and the output is
identical to an uninterrupted run. Each run is a real `rerank` process with its own local Ray, started beside
a stale `ray_current_cluster` file that it must ignore."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from pipelines.config import ModelConfig
from pipelines.model.scoring import Scorer
from tests.datasets import make_pairs, read_output, reference_top_n, write_flat

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

TOP_N = 3


@pytest.fixture
def ray_tmp():
    """A short private Ray temp folder (socket paths have a length limit) holding a stale address file."""
    path = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    (path / "ray").mkdir()
    (path / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # nothing listens there
    yield path
    for proc in psutil.process_iter(["cmdline"]):  # anything of ours still running
        if any(str(path) in part for part in (proc.info["cmdline"] or [])):
            proc.kill()
    subprocess.run(["rm", "-rf", str(path)], check=False)


def rerank(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_driver_killed_then_resumed(tmp_path, tiny_cross_encoder, ray_tmp):
    pairs = make_pairs(num_queries=40, per_query=9, seed=5)
    src = write_flat(pairs, tmp_path / "in", files=3)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"uri": str(src)},
                "output": {"uri": str(out), "top_n": TOP_N},
                "model": {"name_or_path": tiny_cross_encoder, "max_length": 96, "batch_size": 8},
                "scale": {"num_actors": 1, "num_cpus_per_actor": 1, "unit_rows": 3},
                "ray": {"num_cpus": 3},
            }
        )
    )
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)

    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    done = out / "_work" / "done"
    deadline = time.monotonic() + 240
    while driver.poll() is None and time.monotonic() < deadline:
        if done.exists() and len(list(done.glob("*.json"))) >= 4:
            os.killpg(driver.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read()[-3000:]
    assert not (out / "_SUCCESS").exists()
    units = len(json.loads((out / "_work" / "manifest.json").read_text())["units"])
    finished_before = len(list(done.glob("*.json")))
    assert 4 <= finished_before < units

    again = rerank(["run", str(config)], env)
    assert again.returncode == 2 and "did not finish" in again.stderr and "--resume" in again.stderr
    assert again.stderr.count("\n") == 1

    changed = rerank(["run", str(config), "--resume", "--set", "output.top_n=2"], env)
    assert changed.returncode == 2
    assert "output.top_n: 3 (recorded) vs 2 (now)" in changed.stderr

    resumed = rerank(["run", str(config), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["units"] == units and summary["units_resumed"] >= finished_before
    assert summary["pairs_in"] == summary["pairs_scored"] == len(pairs) and summary["rejected"] == 0
    assert (out / "_SUCCESS").exists() and not (out / "_work").exists()

    scores = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96)).score(
        pairs["query"].tolist(), pairs["text"].tolist()
    )
    got, ref = read_output(out), reference_top_n(pairs, scores, TOP_N)
    cols = ["query_id", "doc_id", "rank", "first_stage_rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-4)

    finished = rerank(["run", str(config), "--resume"], env)
    assert finished.returncode == 0 and "already complete" in finished.stdout and "nothing to do" in finished.stdout
