"""Signals at any moment of `rerank run`: a second SIGTERM while stopping does not skip the stop line; SIGTERM
during Ray's start-up ends with exit 143 and one line; a SIGKILLed driver leaves no Ray process behind."""

from __future__ import annotations

import re
import signal
import time

import pytest
import yaml

from tests.datasets import make_pairs, write_flat
from tests.test_lifecycle import CORE_DUMP, Tree, _env, _start_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STOP_LINE = re.compile(
    r"rerank: stopped (after \d+ of \d+ units|before any unit was scored); rerun with --resume to finish"
)


def _config(tmp_path, model: str) -> tuple:
    pairs = make_pairs(num_queries=120, per_query=9, seed=11)
    src = write_flat(pairs, tmp_path / "in", files=2)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"uri": str(src)},
                "output": {"uri": str(out), "top_n": 3},
                "model": {"name_or_path": model, "max_length": 96, "batch_size": 8},
                "scale": {"num_actors": 1, "num_cpus_per_actor": 1, "unit_rows": 3},
                "ray": {"num_cpus": 3},
            }
        )
    )
    return config, out / "_work" / "done"


def _wait_for(proc, tree: Tree, what, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        tree.sample()
        if what():
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"`rerank run` ended or stalled first: {proc.communicate()[1][-2000:]}")


def _names(tree: Tree) -> set[str]:
    out = set()
    for p in tree.seen.values():
        try:
            out.add(p.name())
        except Exception:  # noqa: BLE001, S112 - gone
            continue
    return out


def test_a_second_sigterm_while_stopping_keeps_the_stop_line(tmp_path, tiny_cross_encoder, ray_tmp):
    config, done = _config(tmp_path, tiny_cross_encoder)
    proc = _start_run(config, _env(ray_tmp), resume=False)
    tree = Tree(proc.pid)
    _wait_for(proc, tree, lambda: done.exists() and any(done.glob("*.json")))
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.7)  # what a supervisor that retries does
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert STOP_LINE.fullmatch(err.strip().splitlines()[-1]), err[-3000:]
    assert not [s for s in CORE_DUMP if s in err], err[-3000:]
    assert not tree.wait_gone(), f"processes left: {tree.alive()}"


def test_sigterm_during_ray_start_up(tmp_path, tiny_cross_encoder, ray_tmp):
    config, _ = _config(tmp_path, tiny_cross_encoder)
    proc = _start_run(config, _env(ray_tmp), resume=False)
    tree = Tree(proc.pid)
    _wait_for(proc, tree, lambda: bool(_names(tree) & {"gcs_server", "raylet"}))  # Ray is starting
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert STOP_LINE.fullmatch(err.strip().splitlines()[-1]), err[-3000:]
    assert not [s for s in ("Traceback", "core dumped") if s in err], err[-3000:]
    assert not tree.wait_gone(), f"processes left: {tree.alive()}"


def test_a_sigkilled_driver_leaves_no_ray_process(tmp_path, tiny_cross_encoder, ray_tmp):
    config, done = _config(tmp_path, tiny_cross_encoder)
    proc = _start_run(config, _env(ray_tmp), resume=False)
    tree = Tree(proc.pid)
    _wait_for(proc, tree, lambda: done.exists() and any(done.glob("*.json")))
    tree.sample()
    assert {"gcs_server", "raylet"} <= _names(tree)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    left = tree.wait_gone(timeout=20)
    assert not [p for p in left if "pipelines.engine.reaper" not in p], f"processes left: {left}"
    assert not tree.wait_gone(timeout=10), f"the watchdog itself did not end: {tree.alive()}"
