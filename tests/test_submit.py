"""`rerank submit`: what is packaged and forwarded, one-line errors, and (slow) a real three-node Ray cluster on
this machine: the batch job submitted to it with its scoring actors on the worker nodes only, Ctrl-C stopping a
job, a failed job's exit code, token authentication, and the service with two replicas on two nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests
import yaml

from pipelines.cli import submit
from tests.datasets import make_pairs, read_output, write_packed
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)
pytestmark = pytest.mark.timeout(600)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def rerank(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def job_config(tmp_path: Path, model: str, body: str = "") -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(
        f"input: {{uri: {tmp_path / 'in'}}}\noutput: {{uri: {tmp_path / 'out'}, top_n: 3}}\n"
        f"model: {{name_or_path: {model}, max_length: 96}}\n{body}"
    )
    return p


# ---------------------------------------------------------------------------------------------- no cluster


def test_working_dir_holds_only_the_package_and_the_config(tmp_path):
    cfg = tmp_path / "my job.yaml"
    cfg.write_text("input: {uri: s3://b/in}\n")
    rel = submit.stage_working_dir(cfg, tmp_path / "stage")
    assert rel == Path("submitted/my job.yaml")
    stage = tmp_path / "stage"
    assert sorted(p.name for p in stage.iterdir()) == ["pipelines", "submitted"]
    files = [p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()]
    assert "pipelines/cli/__main__.py" in files and "pipelines/cli/submit.py" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert (stage / rel).read_text() == cfg.read_text()


def test_entrypoint_and_submission_id():
    cmd = submit.entrypoint("run", Path("submitted/my job.yaml"), ["output.top_n=3", "input.uri=[a, b]"], resume=True)
    assert (
        cmd
        == "python -m pipelines.cli run 'submitted/my job.yaml' --set=output.top_n=3 '--set=input.uri=[a, b]' --resume"
    )
    sid = submit.submission_id("eval", "conf/Eval_Cranfield.yaml", datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert re.fullmatch(r"rerank-eval-eval-cranfield-20260102-030405-[0-9a-f]{4}", sid)


def test_environment_forwarded_without_secrets():
    environ = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_PROFILE": "prod",
        "AWS_REGION": "eu-west-1",
        "HF_HUB_OFFLINE": "1",
        "AWS_SECRET_ACCESS_KEY": "shh",
        "HF_TOKEN": "hf_x",
        "HOME": "/home/me",
    }
    assert submit.forwarded_env([], environ) == {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_PROFILE": "prod",
        "AWS_REGION": "eu-west-1",
        "HF_HUB_OFFLINE": "1",
    }
    named = submit.forwarded_env(["HF_TOKEN", "MY_FLAG=on"], environ)
    assert named["HF_TOKEN"] == "hf_x" and named["MY_FLAG"] == "on" and "AWS_SECRET_ACCESS_KEY" not in named
    with pytest.raises(submit.ConfigError, match="NOT_SET is not set"):
        submit.forwarded_env(["NOT_SET"], environ)


def test_kind_from_the_config(tmp_path):
    (tmp_path / "a.yaml").write_text("input: {uri: x}\noutput: {uri: y}\n")
    (tmp_path / "b.yaml").write_text("data: {format: cranfield}\nmodel: {name_or_path: m}\n")
    (tmp_path / "c.yaml").write_text("model: {name_or_path: m}\n")
    assert submit.detect_kind(tmp_path / "a.yaml") == "run"
    assert submit.detect_kind(tmp_path / "b.yaml") == "eval"
    with pytest.raises(submit.ConfigError, match="--job run or --job eval"):
        submit.detect_kind(tmp_path / "c.yaml")


def test_user_errors_are_one_line(tmp_path, tiny_cross_encoder):
    write_packed(make_pairs(3, 3), tmp_path / "in", files=1)
    cfg = job_config(tmp_path, tiny_cross_encoder)
    nobody = f"http://127.0.0.1:{free_port()}"
    cases = [
        (["--set", "output.topn=3"], "output.topn: unknown key"),
        (["--set", "input.uri=data/in"], "input.uri=data/in is a relative local path"),
        (["--set", f"input.uri={tmp_path}/nothing"], "(checked from this machine; --no-check submits"),
        ([], f"nothing answers at {nobody}"),
        # float16 is for the cluster's GPUs, not this machine's CPU: the plan passes it, so only the address fails
        (["--set", "model.dtype=float16"], f"nothing answers at {nobody}"),
        (["--set", "model.backend=onnx", "--set", "model.dtype=float16"], "no fast float16 matmul"),  # no device
    ]
    if not submit.can_resume():
        cases.append((["--resume"], "--resume needs a batch job that can resume"))
    for extra, message in cases:
        res = rerank(["submit", str(cfg), "--address", nobody, *extra], cli_env())
        assert res.returncode == 2, (extra, res.stderr[-2000:])
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("rerank: error:") and message in last, (extra, last)
        assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------- a real cluster

TOKEN = "rerank-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (1 CPU, no `accel`) and two workers (2 CPUs and {accel: 1} each, standing in for one GPU each), with
    Ray's token authentication on (the token in the nodes' environment, nothing written to ~/.ray)."""
    from tests.ray_cluster import LocalCluster

    root = tmp_path_factory.mktemp("rc")  # short: Ray's socket paths must fit in 107 characters
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env["HOME"] = str(root)  # Ray must not read or write the real ~/.ray
    c = LocalCluster(root, env, token=TOKEN)
    # A SIGTERM (e.g. a CI timeout) ends the session through pytest's teardown, which stops the cluster.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    address_file = Path("/tmp/ray/ray_current_cluster")
    before = address_file.read_text() if address_file.exists() else None
    try:
        c.start_head(num_cpus=1)
        c.add_worker(num_cpus=2, resources={"accel": 1})
        c.add_worker(num_cpus=2, resources={"accel": 1})
        c.wait_nodes(3, timeout=180)
        assert (c.nodes[0].temp_dir / "ray_current_cluster").exists()  # the head's address file stays in its temp dir
        yield c
    finally:
        c.stop()
        signal.signal(signal.SIGTERM, previous)
        assert not c._own_pids()
        after = address_file.read_text() if address_file.exists() else None
        assert after == before, "the test cluster left a ray_current_cluster file in /tmp/ray"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def client_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The submitting user's environment: the token in RAY_AUTH_TOKEN, RAY_AUTH_MODE unset (submit retries with the
    token when the cluster answers 401), an empty home."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return cli_env(HOME=str(home), RAY_AUTH_TOKEN=TOKEN, **extra)


def worker_ids(cluster) -> set[str]:
    return {n["node_id"] for n in cluster.alive_nodes() if n["resources_total"].get("accel")}


def job_info(cluster, sid: str) -> dict:
    r = requests.get(f"{cluster.dashboard_url}/api/jobs/{sid}", headers=cluster.headers, timeout=10)
    r.raise_for_status()
    return r.json()


@pytest.mark.slow
def test_batch_job_on_three_nodes_actors_on_workers_only(cluster, tmp_path, tiny_cross_encoder):
    pairs = make_pairs(6, 5)
    write_packed(pairs, tmp_path / "in", files=2)
    cfg = job_config(
        tmp_path,
        tiny_cross_encoder,
        "scale: {num_actors: 2, num_cpus_per_actor: 0.5, batch_rows: 10, actor_resources: {accel: 1}}\n",
    )
    env = client_env(tmp_path, AWS_REGION="eu-west-1", AWS_SECRET_ACCESS_KEY="not-forwarded")
    started = time.monotonic()
    res = rerank(["submit", str(cfg), "--address", cluster.dashboard_url, "--set", "output.top_n=2"], env)
    wall = time.monotonic() - started
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sid = re.search(r"rerank: submitted (\S+) to", res.stdout).group(1)
    assert sid.startswith("rerank-run-job-")
    # The job's own one-line summary came through the followed logs.
    assert f"6 queries, {len(pairs)} pairs scored, 12 rows written" in res.stdout
    out = read_output(tmp_path / "out")
    assert len(out) == 12 and out["rank"].max() == 2 and out.groupby("query_id").size().eq(2).all()

    info = job_info(cluster, sid)
    assert info["status"] == "SUCCEEDED"
    assert info["entrypoint"] == "python -m pipelines.cli run submitted/job.yaml --set=output.top_n=2"
    env_vars = info["runtime_env"]["env_vars"]
    assert env_vars == {"AWS_REGION": "eu-west-1", "HF_HUB_OFFLINE": "1"}

    # Model actors: at most two, placed on worker nodes only; the units scored there too. (An
    # actor that was never needed may be killed before it is placed: it has no node.)
    scorers = [a for a in cluster.actors() if "ModelStage" in (a.get("class_name") or "")]
    assert 1 <= len(scorers) <= 2, [a.get("class_name") for a in cluster.actors()]
    assert {a["node_id"] for a in scorers} - {None} <= worker_ids(cluster)
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert set(summary["scale"]["units_by_node"]) <= worker_ids(cluster)
    # two small files: combined into one unit (small files make few units)
    assert sum(summary["scale"]["units_by_node"].values()) == summary["units"] == 1

    # What was uploaded: the package and the config, nothing else.
    head = cluster.nodes[0].temp_dir
    pkgs = [p for p in head.glob("session_*/runtime_resources/working_dir_files/*") if (p / "submitted").is_dir()]
    assert pkgs and all(sorted(x.name for x in p.iterdir()) == ["pipelines", "submitted"] for p in pkgs)
    print(f"submit of a 6-query job to a 3-node cluster: {wall:.1f} s")

    # --resume goes through the local check (output.mode: resume) and onto the job's command line; the output is
    # complete, so the job leaves it as it is.
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    res = rerank(["submit", str(cfg), "--address", cluster.dashboard_url, "--set", "output.top_n=2", "--resume"], env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sid = re.search(r"rerank: submitted (\S+) to", res.stdout).group(1)
    assert job_info(cluster, sid)["entrypoint"].endswith("--set=output.top_n=2 --resume")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert read_output(tmp_path / "out").equals(out)


@pytest.mark.slow
def test_failed_job_and_missing_token(cluster, tmp_path, tiny_cross_encoder):
    cfg = job_config(tmp_path, tiny_cross_encoder)
    # A user error found on the cluster: the job's exit code (2) is submit's.
    res = rerank(
        ["submit", str(cfg), "--address", cluster.dashboard_url, "--no-check", "--set", "input.uri=/no/such/input"],
        client_env(tmp_path),
    )
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "input not found: /no/such/input" in res.stdout
    assert re.search(r"rerank: job rerank-run-job-\S+ failed:", res.stderr)
    # Without a token: one line saying how to give one.
    home = tmp_path / "empty-home"
    home.mkdir()
    res = rerank(["submit", str(cfg), "--address", cluster.dashboard_url, "--no-check"], cli_env(HOME=str(home)))
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rerank: error: the Ray cluster at") and "RAY_AUTH_TOKEN" in last


@pytest.mark.slow
def test_ctrl_c_stops_the_job(cluster, tmp_path, tiny_cross_encoder):
    write_packed(make_pairs(4, 3), tmp_path / "in", files=1)
    cfg = job_config(tmp_path, tiny_cross_encoder, "scale: {num_actors: 1, num_cpus_per_actor: 0.5}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "submit", str(cfg), "--address", cluster.dashboard_url]
        + ["--on-interrupt", "stop"],
        cwd=ROOT,
        env=client_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("rerank: submitted" in ln for ln in lines) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    sid = re.search(r"rerank: submitted (\S+) to", "".join(lines)).group(1)
    proc.send_signal(2)  # SIGINT, as Ctrl-C
    rc = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert rc == 130, stderr
    assert f"stopping job {sid}" in stderr
    assert job_info(cluster, sid)["status"] == "STOPPED"
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.slow
def test_eval_submitted_to_the_cluster(cluster, tmp_path, tiny_cross_encoder):
    report = tmp_path / "report"
    sets = {
        "model.name_or_path": tiny_cross_encoder,
        "model.kind": "cross-encoder",
        "model.max_length": "96",
        "data.max_queries": "5",
        "k_values": "[5]",
        "n_grid": "[1, 5]",
        "n_base": "[5]",
        "first_stage.depth": "5",
        "report.dir": str(report),
        "scale.num_actors": "1",
        "scale.num_cpus_per_actor": "0.5",
        "scale.actor_resources": "{accel: 1}",
    }
    args = ["submit", str(ROOT / "conf" / "eval_cranfield.yaml"), "--address", cluster.dashboard_url]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    res = rerank(args, client_env(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sid = re.search(r"rerank: submitted (\S+) to", res.stdout).group(1)
    assert sid.startswith("rerank-eval-eval-cranfield-")
    assert "N_Base" in res.stdout  # the report's table, printed by the job, came through the logs
    assert (report / "report.json").is_file()


@pytest.mark.slow
def test_service_two_replicas_on_two_nodes(cluster, tmp_path, tiny_cross_encoder):
    """conf/serve_deploy.yaml as a cluster runs it (`serve deploy`), with the code in a working_dir zip."""
    stage = tmp_path / "pkg"
    submit.stage_working_dir(ROOT / "conf" / "serve.yaml", stage / "rerank")
    pkg = tmp_path / "rerank.zip"
    with zipfile.ZipFile(pkg, "w") as z:  # one top-level folder, as Ray wants of a working_dir zip
        for f in stage.rglob("*"):
            z.write(f, f.relative_to(stage).as_posix())
    port = free_port()
    conf = yaml.safe_load((ROOT / "conf" / "serve_deploy.yaml").read_text())
    conf["proxy_location"] = "HeadOnly"  # the nodes share one host: a proxy per node would share one port
    conf["http_options"] = {"host": "127.0.0.1", "port": port}
    app = conf["applications"][0]
    app["runtime_env"] = {"working_dir": pkg.as_uri(), "env_vars": {"HF_HUB_OFFLINE": "1"}}
    app["args"]["model"] = {"name_or_path": tiny_cross_encoder, "max_length": 96, "batch_size": 16}
    app["args"]["serve"] |= {"num_cpus_per_replica": 0.5, "num_gpus_per_replica": 0}
    app["args"]["serve"]["replica_resources"] = {"accel": 1}
    app["args"]["serve"].pop("autoscaling")
    app["args"]["serve"]["num_replicas"] = 2
    deploy = tmp_path / "serve_deploy.yaml"
    deploy.write_text(yaml.safe_dump(conf))

    env = cli_env(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    try:
        _deploy_and_query(cluster, deploy, env, port)
    finally:  # the replicas hold both workers' `accel`: give them back
        requests.delete(f"{cluster.dashboard_url}/api/serve/applications/", headers=cluster.headers, timeout=60)


def _deploy_and_query(cluster, deploy: Path, env: dict[str, str], port: int) -> None:
    res = subprocess.run(
        [f"{VENV_BIN}/serve", "deploy", str(deploy), "--address", cluster.dashboard_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr

    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        r = requests.get(f"{cluster.dashboard_url}/api/serve/applications/", headers=cluster.headers, timeout=10)
        details = r.json()["applications"].get("rerank", {})
        status = details.get("status")
        if status == "RUNNING":
            break
        assert status != "DEPLOY_FAILED", details
        time.sleep(1.0)
    assert status == "RUNNING", details
    replicas = [rep for d in details["deployments"].values() for rep in d["replicas"] if rep["state"] == "RUNNING"]
    assert len(replicas) == 2
    assert {rep["node_id"] for rep in replicas} == worker_ids(cluster)

    body = {"model": "tiny", "query": "boundary layer", "documents": ["flow over a wing", "heat", "shock wave"]}
    for _ in range(8):
        r = requests.post(f"http://127.0.0.1:{port}/v1/rerank", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert sorted(x["index"] for x in r.json()["results"]) == [0, 1, 2]
