"""The command line as users run it: one-line errors with exit code 2, and a whole job through jobs/rerank.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datasets import make_pairs, read_output, write_flat

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def run(args, cwd, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=280, check=False)


def config(tmp_path, model, body=""):
    p = tmp_path / "job.yaml"
    p.write_text(
        f"input: {{uri: {tmp_path / 'in'}}}\noutput: {{uri: {tmp_path / 'out'}, top_n: 3}}\n"
        f"model: {{name_or_path: {model}, max_length: 96}}\n{body}"
    )
    return p


@pytest.mark.parametrize(
    "sets, message",
    [
        (["--set", "output.topn=3"], "output.topn: unknown key"),
        (["--set", "input.uri=/definitely/not/here"], "input not found: /definitely/not/here"),
        (["--set", "model.name_or_path=/no/such/model"], "cannot load model '/no/such/model'"),
    ],
)
def test_user_errors_are_one_line(tmp_path, tiny_cross_encoder, sets, message):
    write_flat(make_pairs(3, 3), tmp_path / "in", files=1)
    res = run([sys.executable, "-m", "pipelines.cli", "run", str(config(tmp_path, tiny_cross_encoder)), *sets], ROOT)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rerank: error:") and message in last


def test_job_entry_point_runs_a_job(tmp_path, tiny_cross_encoder):
    pairs = make_pairs(6, 5)
    write_flat(pairs, tmp_path / "in", files=2)
    cfg = config(tmp_path, tiny_cross_encoder, "scale: {num_actors: 1, num_cpus_per_actor: 0.5}\n")
    res = run([sys.executable, "jobs/rerank.py", "--config", str(cfg), "--set", "output.top_n=2"], ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"6 queries, {len(pairs)} pairs scored, 12 rows written" in res.stdout
    out = read_output(tmp_path / "out")
    assert len(out) == 12 and out["rank"].max() == 2
    # A second run into the same folder is refused, not mixed in.
    again = run([sys.executable, "jobs/rerank.py", "--config", str(cfg)], ROOT)
    assert again.returncode == 2 and "output.mode=overwrite" in again.stderr
