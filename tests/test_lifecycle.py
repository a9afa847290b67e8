"""How `rerank run` and `rerank serve` live and stop, as real processes with their own local Ray.

- Loopback only: every socket that the process tree of a running `rerank run` and `rerank serve` listens on
  (GCS, raylet, object manager, workers, dashboard agent, metrics export, runtime-env agent, Serve's proxy) is on
  127.0.0.1 / ::1, read with psutil while they run.
- Signals: SIGTERM to `rerank run` mid-job stops it like Ctrl-C (exit 143, one line saying how far it got, no
  core dump, no process left); SIGINT does the same with 130; `--resume` then finishes with the output of an
  uninterrupted run. SIGTERM to `rerank serve` stops the service and its Ray: exit 0, no process left.

Each process gets a private Ray temp folder; teardown kills only processes whose command line names it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import requests
import yaml

from pipelines.config import ModelConfig
from pipelines.model.scoring import Scorer
from tests.datasets import make_pairs, read_output, reference_top_n, write_flat
from tests.ports import free_port, port_open

ROOT = Path(__file__).resolve().parent.parent
TOP_N = 3
CORE_DUMP = ("SIGTERM received", "logging.cc", "Aborted", "core dumped", "Traceback")


def _env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        RAY_TMPDIR=str(ray_tmp),
        HF_HUB_OFFLINE="1",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    env.pop("RAY_ADDRESS", None)
    return env


class Tree:
    """A process and its descendants, sampled while it runs: every process seen, every listening socket."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.seen: dict[int, psutil.Process] = {}
        self.listening: set[tuple[str, int, str]] = set()

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            self.seen.setdefault(p.pid, p)
            try:
                conns = p.net_connections(kind="inet")
                name = p.name()
            except psutil.Error:
                continue
            self.listening |= {(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN}

    def alive(self) -> list[str]:
        """Descendants seen that still run (zombies waiting for their parent to reap them do not count)."""
        left = []
        for p in self.seen.values():
            if p.pid == self.root.pid:
                continue
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {p.name()} {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                pass
        return left

    def wait_gone(self, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:  # ::ffff:127.0.0.1
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _assert_loopback_only(tree: Tree, must_include: set[str]) -> None:
    names = {name for _, _, name in tree.listening}
    assert must_include <= names, f"expected listeners of {sorted(must_include)}, saw {sorted(tree.listening)}"
    exposed = sorted(s for s in tree.listening if not _loopback(s[0]))
    assert not exposed, f"listening beyond loopback: {exposed} (all: {sorted(tree.listening)})"
    print("listening:", sorted(tree.listening))


# ---------------------------------------------------------------------------------------------- rerank run


def _start_run(config: Path, env: dict[str, str], resume: bool) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", str(config), *(["--resume"] if resume else [])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a signal for it alone, as Kubernetes or systemd send one
    )


def _stop_mid_job(proc: subprocess.Popen, done: Path, more: int, sig: int, tree: Tree | None) -> tuple[str, int]:
    """Send `sig` once `more` units have committed beyond those done when the first commit of this run was seen;
    returns (stderr, units done once it exited). Units of the tiny model take milliseconds, so the poll is tight:
    the process tree (`tree`) is sampled only while the actor starts (every 0.5 s) and once at the first commit."""

    def count() -> int:
        return len(list(done.glob("*.json"))) if done.exists() else 0

    before = count()
    target, next_sample = None, 0.0
    deadline = time.monotonic() + 200
    while proc.poll() is None and time.monotonic() < deadline:
        n = count()
        if target is None:
            if n > before:
                target = n + more  # counted before the slow sample below, which the job outruns
            if tree is not None and (n > before or time.monotonic() >= next_sample):
                tree.sample()  # slow (every process's sockets): not in the tight part of the loop
                next_sample = time.monotonic() + 0.5
        elif n >= target:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    else:
        proc.kill()
        raise AssertionError(f"`rerank run` ended or stalled before it was signalled: {proc.communicate()[1][-3000:]}")
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"`rerank run` did not stop on {signal.Signals(sig).name}") from None
    return err, count()


def _check_stopped(err: str, rc: int, expected_rc: int, done_now: int, units: int, tree: Tree) -> None:
    assert rc == expected_rc, err[-3000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"rerank: stopped after (\d+) of (\d+) units; rerun with --resume to finish", last)
    assert match, err[-3000:]
    assert (int(match[1]), int(match[2])) == (done_now, units), last
    assert done_now < units, "the job finished before the signal: nothing was stopped"
    assert not [s for s in CORE_DUMP if s in err], err[-3000:]
    assert not tree.wait_gone(), f"processes left after the stop: {tree.alive()}"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_run_stops_on_sigterm_and_sigint_then_resumes(tmp_path, tiny_cross_encoder, ray_tmp):
    """SIGTERM mid-job (143), `--resume` stopped by SIGINT (130), `--resume` to the end: the output equals the
    reference of an uninterrupted run. The first run's listening sockets are all on loopback."""
    # 1,500 pairs, 500 units of 3: a few seconds of scoring, so a signal sent after a few commits lands mid-job
    pairs = make_pairs(num_queries=200, per_query=9, seed=7)
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
    env = _env(ray_tmp)
    done = out / "_work" / "done"

    first = _start_run(config, env, resume=False)
    tree = Tree(first.pid)
    err, done_now = _stop_mid_job(first, done, 2, signal.SIGTERM, tree)
    units = len(json.loads((out / "_work" / "manifest.json").read_text())["units"])
    _check_stopped(err, first.returncode, 143, done_now, units, tree)
    assert not (out / "_SUCCESS").exists()
    _assert_loopback_only(tree, {"gcs_server", "raylet"})

    second = _start_run(config, env, resume=True)
    tree = Tree(second.pid)
    err, done_after = _stop_mid_job(second, done, 2, signal.SIGINT, tree)
    _check_stopped(err, second.returncode, 130, done_after, units, tree)

    third = _start_run(config, env, resume=True)
    _, err = third.communicate(timeout=240)
    assert third.returncode == 0, err[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["units"] == units and summary["units_resumed"] == done_after
    assert summary["pairs_in"] == summary["pairs_scored"] == len(pairs) and summary["rejected"] == 0
    assert (out / "_SUCCESS").exists() and not (out / "_work").exists()

    scores = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96)).score(
        pairs["query"].tolist(), pairs["text"].tolist()
    )
    got, ref = read_output(out), reference_top_n(pairs, scores, TOP_N)
    cols = ["query_id", "doc_id", "rank", "first_stage_rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-4)


# ---------------------------------------------------------------------------------------------- rerank serve


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_serve_loopback_only_and_sigterm_stops_everything(tiny_cross_encoder, ray_tmp):
    port = free_port()
    cmd = [
        sys.executable, "-m", "pipelines.cli", "serve", str(ROOT / "conf/serve.yaml"),
        "--set", f"model.name_or_path={tiny_cross_encoder}", "--set", "model.device=cpu",
        "--set", f"serve.port={port}", "--set", "serve.num_cpus_per_replica=0.5", "--set", "ray.num_cpus=2",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(ray_tmp, RAY_DEDUP_LOGS="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tree = Tree(proc.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"`rerank serve` exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}"
            tree.sample()
            try:
                res = requests.get(f"{url}/health", timeout=2)
                if res.status_code == 200 and res.json().get("status") == "ok":
                    break
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"{url}/health not ready after 150 s")
        res = requests.post(f"{url}/v1/rerank", json={"query": "wing", "documents": ["a wing", "heat"]}, timeout=30)
        assert res.status_code == 200, res.text
        for _ in range(6):  # agents and exporters that start late
            tree.sample()
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"`rerank serve` did not stop on SIGTERM: {out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    assert "service stopped" in out, out[-3000:]
    assert not [s for s in CORE_DUMP if s in out], out[-3000:]
    assert not tree.wait_gone(), f"processes left after SIGTERM: {tree.alive()}"
    assert not port_open(port)
    assert port in {p for _, p, _ in tree.listening}, "Serve's proxy was not seen listening"
    _assert_loopback_only(tree, {"gcs_server", "raylet"})


def test_ray_host_is_a_node_address():
    from pipelines.config import RayConfig, validate_config
    from pipelines.errors import ConfigError

    assert RayConfig().host == "127.0.0.1" and validate_config(RayConfig, {"host": "::1"}, source="t").host == "::1"
    for host, says in (("0.0.0.0", "not a wildcard"), ("::", "not a wildcard"), ("my-host", "not an IP address")):
        with pytest.raises(ConfigError, match=says):
            validate_config(RayConfig, {"host": host}, source="t")
