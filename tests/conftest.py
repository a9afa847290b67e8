"""Shared fixtures: tiny models built once per session, a local Ray per module, an S3 server on loopback."""

from __future__ import annotations

import os

import pytest

from tests.ports import free_port
from tests.ray_cluster import start_local_ray
from tests.s3_faults import s3_fault_proxy  # noqa: F401 - the fixture, documented in tests/s3_faults.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> str:
    from tests.tiny_models import build_cross_encoder

    return str(build_cross_encoder(tmp_path_factory.mktemp("models") / "tiny-ce"))


@pytest.fixture(scope="session")
def tiny_cross_encoder_2labels(tmp_path_factory) -> str:
    from tests.tiny_models import build_cross_encoder

    return str(build_cross_encoder(tmp_path_factory.mktemp("models") / "tiny-ce2", num_labels=2, seed=1))


@pytest.fixture(scope="session")
def tiny_bi_encoder(tmp_path_factory) -> str:
    from tests.tiny_models import build_bi_encoder

    return str(build_bi_encoder(tmp_path_factory.mktemp("models") / "tiny-bi"))


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray per test module (a fresh start costs ~5 s). More logical CPUs than cores so actors
    never starve the read tasks on a 2-core machine."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 and a free port; yields its endpoint URL. Ray workers reach it through
    AWS_ENDPOINT_URL and the fake credentials set here (restored afterwards)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def ray_tmp():
    """A short private Ray temp folder for a `rerank` subprocess (socket paths have a length limit); anything of
    ours left is killed afterwards."""
    import shutil
    import tempfile
    from pathlib import Path

    import psutil

    path = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    yield path
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(path) in part for part in (proc.info["cmdline"] or [])):
                proc.kill()
        except psutil.Error:
            pass
    shutil.rmtree(path, ignore_errors=True)
