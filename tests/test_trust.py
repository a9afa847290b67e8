"""Trusting the output: a resume checks what it resumes (config and input content, also of a finished job), one
job per output folder (the lease), no secret written anywhere, and inputs as writers produce them (.PARQUET
names, dictionary-encoded columns)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.config import ModelConfig, StorageConfig
from pipelines.errors import ConfigError, InputError, OutputError
from pipelines.io.commit import Progress
from pipelines.io.lease import Lease
from pipelines.io.storage import Storage, credentials_to_environment
from pipelines.job import plan_rerank, run_rerank
from pipelines.model.scoring import Scorer
from tests.datasets import make_pairs, read_output, reference_top_n, small_job, write_flat

pytestmark = pytest.mark.timeout(300)

TOP_N = 3


@pytest.fixture(scope="module")
def pairs() -> pd.DataFrame:
    return make_pairs(num_queries=10, per_query=7, seed=3)


@pytest.fixture(scope="module")
def reference(pairs, tiny_cross_encoder) -> pd.DataFrame:
    scores = Scorer(ModelConfig(name_or_path=tiny_cross_encoder, max_length=96)).score(
        pairs["query"].tolist(), pairs["text"].tolist()
    )
    return reference_top_n(pairs, scores, TOP_N)


def assert_equal_to(out: Path, ref: pd.DataFrame) -> None:
    got = read_output(out)
    cols = ["query_id", "doc_id", "rank"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-4)


def job(tmp_path, model, src, **extra):
    return small_job(tmp_path, model, src, TOP_N, **extra)


def reversed_texts(path: Path) -> None:
    """Rewrite a file with every text reversed: the same rows and byte size (uncompressed, no dictionary, no
    statistics), other content."""
    stat = path.stat()
    df = pq.read_table(path).to_pandas()
    df["text"] = [t[::-1] for t in df["text"]]
    time.sleep(0.01)
    write_plain(df, path)
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns != stat.st_mtime_ns


def write_plain(df: pd.DataFrame, path: Path) -> None:
    pq.write_table(
        pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False),
        path,
        compression="none",
        use_dictionary=False,
        write_statistics=False,
    )


def write_uncompressed(df: pd.DataFrame, folder: Path, files: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        write_plain(df.iloc[i::files], folder / f"part-{i}.parquet")
    return folder


# ---------------------------------------------------------------------------- resume checks content


def test_an_interrupted_job_with_a_same_size_changed_file_is_not_resumed(tmp_path, tiny_cross_encoder, pairs):
    """The plan of a resume compares each input file's identity with the manifest's (it used to compare sizes
    only): a file rewritten with the same size is refused, naming the file."""
    src = write_uncompressed(pairs, tmp_path / "in", files=2)
    config = job(tmp_path, tiny_cross_encoder, src)
    plan = plan_rerank(config)
    # What run_rerank records before it scores anything: an interrupted run leaves exactly this behind.
    plan.progress.write_manifest({"version": 2, "fingerprint": plan.fingerprint, "join_partitions": 2, "units": None})
    resume = job(tmp_path, tiny_cross_encoder, src, output__mode="resume")
    plan_rerank(resume)  # unchanged: accepted
    reversed_texts(src / "part-1.parquet")
    with pytest.raises(OutputError, match=r"part-1.parquet changed since the job started") as err:
        plan_rerank(resume)
    assert "part-0" not in str(err.value)
    (src / "part-2.parquet").write_bytes((src / "part-0.parquet").read_bytes())
    with pytest.raises(OutputError, match=r"part-2.parquet is new"):
        plan_rerank(resume)


def test_a_finished_job_is_resumed_only_by_the_same_job(ray_local, tmp_path, tiny_cross_encoder, pairs, reference):
    src = write_flat(pairs, tmp_path / "in", files=2)
    run_rerank(job(tmp_path, tiny_cross_encoder, src))
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert set(summary["fingerprint"]["input_files"]) == {str(src / "part-0.parquet"), str(src / "part-1.parquet")}

    same = plan_rerank(job(tmp_path, tiny_cross_encoder, src, output__mode="resume", scale__num_actors=1))
    assert same.already_complete  # scale may differ: it does not change the results
    assert run_rerank(same.config, same).rows_written == summary["rows_written"]
    with pytest.raises(OutputError, match=r"output.top_n: 3 \(recorded\) vs 2 \(now\)"):
        plan_rerank(job(tmp_path, tiny_cross_encoder, src, output__mode="resume", output__top_n=2))
    other = write_flat(pairs.head(30), tmp_path / "other", files=1)
    with pytest.raises(OutputError, match=r"cannot resume .*the finished job.*other/part-0.parquet is new"):
        plan_rerank(job(tmp_path, tiny_cross_encoder, other, output__mode="resume"))
    pq.write_table(pq.read_table(src / "part-0.parquet"), src / "part-0.parquet", compression="none")
    with pytest.raises(OutputError, match=r"part-0.parquet changed since the job started"):
        plan_rerank(job(tmp_path, tiny_cross_encoder, src, output__mode="resume"))
    assert_equal_to(tmp_path / "out", reference)  # nothing was touched by the refusals


# ---------------------------------------------------------------------------- one job per output folder


def plant_lease(out: Path, renewed_ago_s: float, host: str = "another-host.example", pid: int = 4242) -> None:
    (out / "_work").mkdir(parents=True, exist_ok=True)
    (out / "_work" / "lease.json").write_text(
        json.dumps(
            {
                "host": host,
                "pid": pid,
                "started_at": "2026-01-01T00:00:00+00:00",
                "token": "theirs",
                "renewed_at": time.time() - renewed_ago_s,
            }
        )
    )


def test_a_lease_left_by_a_killed_run_is_taken_over_after_its_timeout(
    ray_local, tmp_path, tiny_cross_encoder, pairs, reference
):
    src = write_flat(pairs, tmp_path / "in", files=2)
    out = tmp_path / "out"
    plant_lease(out, renewed_ago_s=0.0)
    resume = job(tmp_path, tiny_cross_encoder, src, output__mode="resume", output__lease_timeout_s=3)
    with pytest.raises(OutputError, match=r"in use by another run \(host another-host.example, pid 4242"):
        run_rerank(resume)
    with pytest.raises(OutputError, match="in use by another run"):
        run_rerank(job(tmp_path, tiny_cross_encoder, src, output__mode="overwrite", output__lease_timeout_s=3))
    time.sleep(3.5)  # no renewal for longer than lease_timeout_s: the run that held it is gone
    with pytest.raises(OutputError, match="did not finish"):  # output.mode=error never takes a lease over
        run_rerank(job(tmp_path, tiny_cross_encoder, src, output__lease_timeout_s=3))
    summary = run_rerank(resume)
    assert summary.pairs_scored == len(pairs)
    assert_equal_to(out, reference)
    assert not (out / "_work").exists()


def test_a_lease_of_a_dead_process_on_this_machine_is_stale_at_once(tmp_path, tiny_cross_encoder, pairs):
    src = write_flat(pairs, tmp_path / "in", files=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant_lease(tmp_path / "out", renewed_ago_s=0.0, host=socket.gethostname(), pid=dead.pid)
    with pytest.raises(OutputError, match="did not finish"):  # not "in use": its holder is gone
        plan_rerank(job(tmp_path, tiny_cross_encoder, src))


def test_the_lease_is_renewed_and_a_run_that_lost_it_does_not_publish(tmp_path):
    out = tmp_path / "out"
    progress = Progress(Storage.for_uri(str(out)), str(out))
    lease = Lease(progress, timeout_s=1.0)
    lease.acquire(takeover=False)
    first = json.loads((out / "_work" / "lease.json").read_text())["renewed_at"]
    time.sleep(0.8)
    assert json.loads((out / "_work" / "lease.json").read_text())["renewed_at"] > first
    with pytest.raises(OutputError, match="in use by another run"):
        Lease(progress, timeout_s=1.0).acquire(takeover=True)
    plant_lease(out, renewed_ago_s=0.0)  # another run took it over
    time.sleep(0.8)
    with pytest.raises(OutputError, match=r"lost the lease .*another run took it over .*another-host.example"):
        progress.finish({"queries": 0}, lease)
    assert not (out / "_SUCCESS").exists() and not (out / "_summary.json").exists()
    lease.release()
    assert (out / "_work" / "lease.json").exists()  # not ours any more: left alone


@pytest.fixture
def ray_tmp():
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    yield path
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(str(path) in part for part in (proc.info["cmdline"] or [])):
            proc.kill()
    shutil.rmtree(path, ignore_errors=True)


def cli_env(ray_tmp: Path) -> dict[str, str]:
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    return env


def write_job_yaml(path: Path, model: str, src: Path, out: Path, **storage) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "input": {"uri": str(src)},
                "output": {"uri": str(out), "top_n": TOP_N},
                "model": {"name_or_path": model, "max_length": 96, "batch_size": 8},
                "scale": {"num_actors": 1, "num_cpus_per_actor": 1, "unit_rows": 6},
                "ray": {"num_cpus": 3},
                **({"storage": storage} if storage else {}),
            }
        )
    )
    return path


class Poller(threading.Thread):
    """Watches an output folder while jobs run: any moment with _SUCCESS but a result file missing is recorded,
    and (optionally) every file's bytes are collected, to search them afterwards."""

    def __init__(self, out: Path, expect_files: int | None = None, collect: bool = False):
        super().__init__(daemon=True)
        self.out, self.expect, self.collect = out, expect_files, collect
        self.bad: list[str] = []
        self.seen: dict[str, bytes] = {}
        self.polls = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.polls += 1
            if (self.out / "_SUCCESS").exists():
                parts = sorted(self.out.glob("part-*.parquet"))
                try:
                    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
                except (OSError, pa.ArrowInvalid) as err:
                    rows = -1
                    self.bad.append(f"unreadable result beside _SUCCESS: {err}")
                if not parts or (self.expect is not None and rows != self.expect):
                    self.bad.append(f"_SUCCESS with {len(parts)} result files, {rows} rows")
            if self.collect and self.out.exists():
                for p in self.out.rglob("*"):
                    try:
                        if p.is_file():
                            self.seen[str(p)] = p.read_bytes()
                    except OSError:
                        pass  # renamed or deleted between listing and reading
            time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_runs_at_once_one_is_refused(tmp_path, tiny_cross_encoder, pairs, reference, ray_tmp):
    src = write_flat(pairs, tmp_path / "in", files=2)
    out = tmp_path / "out"
    config = write_job_yaml(tmp_path / "job.yaml", tiny_cross_encoder, src, out)
    env = cli_env(ray_tmp)
    poller = Poller(out, expect_files=len(reference))
    poller.start()
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(config)]
    runs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    # A third run, with --resume, started while the winner is scoring: refused too (it used to redo every unit).
    done = out / "_work" / "done"
    deadline = time.monotonic() + 240
    while not (done.exists() and any(done.glob("*.json"))) and time.monotonic() < deadline:
        if all(r.poll() is not None for r in runs):
            break
        time.sleep(0.05)
    late = subprocess.run(cmd + ["--resume"], check=False, env=env, capture_output=True, text=True, timeout=300)
    results = [(r.wait(timeout=300), *r.communicate()) for r in runs]
    poller.stop.set()
    poller.join()
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, _, err in results if rc == 2)
    # Refused while the winner held the folder, or, on a loaded machine, planned before the winner started and
    # took the lease after it had finished: then it plans again and finds the finished job.
    assert "is in use by another run" in refused or "already holds a finished job" in refused, refused
    assert refused.count("\n") == 1, refused  # one line, before Ray started
    if late.returncode == 0:  # the winner finished before the late run planned: it found the job complete
        assert "already complete" in late.stdout
    else:
        assert late.returncode == 2 and "is in use by another run" in late.stderr, late.stderr
    assert not poller.bad, poller.bad[:3]
    assert poller.polls > 10
    assert_equal_to(out, reference)
    assert (out / "_SUCCESS").exists() and not (out / "_work").exists()


# ---------------------------------------------------------------------------- secrets


SECRET_KEY_ID = "AKIAPLANTEDKEYID7Q2X"
SECRET = "planted/Secret+Value9f3e1c7b2a"


def search(roots: list[Path], blobs: dict[str, bytes], needles: list[str]) -> list[str]:
    """Where any needle appears: files under the roots (binary or text) and the given blobs."""
    hits = []
    for root in roots:
        for p in root.rglob("*") if root.is_dir() else [root]:
            try:
                if p.is_file() and not p.is_socket():
                    data = p.read_bytes()
                    hits += [f"{p}: {n}" for n in needles if n.encode() in data]
            except OSError:
                pass
    for name, data in blobs.items():
        hits += [f"{name}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_planted_s3_keys_are_written_nowhere(tmp_path, tiny_cross_encoder, pairs, reference, ray_tmp):
    """Keys set with --set (the worst case: on the command line) end in no output, work file, log or Ray file;
    the same search finds them where they were planted (the positive control)."""
    src = write_flat(pairs, tmp_path / "in", files=2)
    out = tmp_path / "out"
    config = write_job_yaml(tmp_path / "job.yaml", tiny_cross_encoder, src, out)
    control = tmp_path / "control.txt"
    control.write_text(f"storage.secret_access_key={SECRET} access_key_id={SECRET_KEY_ID}")
    poller = Poller(out, collect=True)
    poller.start()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "-v",
            "run",
            str(config),
            f"--set=storage.access_key_id={SECRET_KEY_ID}",
            f"--set=storage.secret_access_key={SECRET}",
        ],
        env=cli_env(ray_tmp),
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
    )
    poller.stop.set()
    poller.join()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "deprecated" in run.stderr
    assert any("/_work/" in name for name in poller.seen), "the work folder was never seen"
    needles = [SECRET, SECRET_KEY_ID]
    assert search([control], {}, needles) == [f"{control}: {SECRET}", f"{control}: {SECRET_KEY_ID}"]
    hits = search([out, ray_tmp], poller.seen | {"stdout": run.stdout.encode(), "stderr": run.stderr.encode()}, needles)
    assert not hits, hits[:5]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["config"]["storage"]["secret_access_key"] is None
    assert_equal_to(out, reference)


def test_keys_never_reach_ray(ray_local, tmp_path, tiny_cross_encoder, pairs, monkeypatch):
    """In-process: Ray's internal KV and actor table hold no key after a job (positive control: a value put in
    the KV is found by the same search); a library call with keys in the config is refused, not shipped."""
    from ray._private import state
    from ray.experimental import internal_kv

    src = write_flat(pairs, tmp_path / "in", files=1)
    with_keys = job(
        tmp_path, tiny_cross_encoder, src, storage__access_key_id=SECRET_KEY_ID, storage__secret_access_key=SECRET
    )
    with pytest.raises(ConfigError, match="not sent to Ray workers"):
        run_rerank(with_keys)
    for env in StorageConfig.CREDENTIAL_ENV.values():
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(ConfigError, match="cluster's environment"):
        credentials_to_environment(with_keys.storage, joining_cluster=True)
    stripped = credentials_to_environment(with_keys.storage, joining_cluster=False)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET and not stripped.has_credentials
    run_rerank(with_keys.model_copy(update={"storage": stripped}))

    internal_kv._internal_kv_put(b"rerank-test-control", f"x{SECRET}x".encode())
    blobs = {"actors": json.dumps(state.actors(), default=str).encode()}
    for ns in (None, "fun", "session", "job", "serve"):
        for key in internal_kv._internal_kv_list(b"", namespace=ns):
            blobs[f"kv[{ns}]{key[:40]!r}"] = internal_kv._internal_kv_get(key, namespace=ns) or b""
    hits = search([], blobs, [SECRET, SECRET_KEY_ID])
    assert hits == [f"kv[None]{b'rerank-test-control'!r}: {SECRET}"], hits
    internal_kv._internal_kv_del(b"rerank-test-control")
    assert "**********" in repr(with_keys.storage) and SECRET not in repr(with_keys.storage)


# ---------------------------------------------------------------------------- inputs as writers produce them


def test_upper_case_parquet_names_are_read(ray_local, tmp_path, tiny_cross_encoder, pairs, reference):
    src = write_flat(pairs, tmp_path / "in", files=2)
    (src / "part-1.parquet").rename(src / "PART-1.PARQUET")
    (src / "notes.txt").write_text("not Parquet")
    summary = run_rerank(job(tmp_path, tiny_cross_encoder, src))
    assert summary.pairs_in == len(pairs) and summary.input_files == 2
    assert_equal_to(tmp_path / "out", reference)
    (tmp_path / "others").mkdir()
    (tmp_path / "others" / "a.csv").write_text("x")
    with pytest.raises(InputError, match=r"no Parquet files found at .*others \(it holds 1 other file.*a.csv"):
        plan_rerank(job(tmp_path, tiny_cross_encoder, tmp_path / "others", output__uri=str(tmp_path / "o2")))


def test_dictionary_encoded_columns_are_read_as_strings(ray_local, tmp_path, tiny_cross_encoder, pairs, reference):
    (tmp_path / "in").mkdir()
    table = pa.Table.from_pandas(pairs, preserve_index=False)
    for name in ("query", "text"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, table.column(name).dictionary_encode())
    pq.write_table(table, tmp_path / "in" / "a.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "in" / "a.parquet").field("text").type)
    run_rerank(job(tmp_path, tiny_cross_encoder, tmp_path / "in"))
    assert_equal_to(tmp_path / "out", reference)


def test_files_that_disagree_are_named_field_by_field(tmp_path, tiny_cross_encoder):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"query_id": [1], "query": ["q"], "doc_id": [1], "text": ["t"]}), tmp_path / "in/a.parquet")
    pq.write_table(
        pa.table({"query_id": ["x"], "query": ["q"], "doc_id": [1], "text": ["t"]}), tmp_path / "in/b.parquet"
    )
    with pytest.raises(InputError) as err:
        plan_rerank(job(tmp_path, tiny_cross_encoder, tmp_path / "in"))
    assert "query_id type is int64 in " in str(err.value) and "but string in" in str(err.value)
    assert "InputLayout" not in str(err.value)


def test_a_missing_bucket_is_named(s3_server, tmp_path, tiny_cross_encoder):
    with pytest.raises(InputError, match=r"bucket 'no-such-bucket-x' does not exist"):
        plan_rerank(job(tmp_path, tiny_cross_encoder, "s3://no-such-bucket-x/in/"))


def test_the_lease_on_s3_uses_conditional_writes(s3_server, tmp_path):
    """On S3 the lease is a conditional PUT (If-None-Match: *), renewed with If-Match: a second holder is refused,
    and a renewal after another run's takeover fails, so the first run does not publish."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing", use_listings_cache=False)
    if not fs.exists("leases"):
        fs.mkdir("leases")
    storage = Storage.for_uri("s3://leases/job", StorageConfig(endpoint_url=s3_server))
    progress = Progress(storage, "leases/job")
    lease = Lease(progress, timeout_s=1.0)
    lease.acquire(takeover=False)
    first = json.loads(fs.cat_file("leases/job/_work/lease.json"))
    with pytest.raises(OutputError, match="in use by another run"):
        Lease(progress, timeout_s=1.0).acquire(takeover=True)
    time.sleep(0.8)
    assert json.loads(fs.cat_file("leases/job/_work/lease.json"))["renewed_at"] > first["renewed_at"]
    lease.stop_renewing()
    time.sleep(1.2)  # not renewed for longer than the timeout: another run takes it over
    other = Lease(progress, timeout_s=1.0)
    other.acquire(takeover=True)
    assert json.loads(fs.cat_file("leases/job/_work/lease.json"))["token"] == other.holder["token"]
    assert storage.replace_if(lease.path, b"{}", lease._tag or "") is None  # the old tag no longer matches
    other.release()
    assert not fs.exists("leases/job/_work/lease.json")


def test_a_run_that_finishes_between_the_plan_and_the_lease_is_noticed(
    tmp_path, tiny_cross_encoder, pairs, monkeypatch
):
    """A --resume planned while another run was publishing (its plan saw the unfinished job; by the time it takes
    the lease, the other run has written _SUCCESS and gone) must not redo the job over the finished output: holding
    the lease, it sees the output changed and plans again, and finds the job complete."""
    import shutil

    from pipelines.job import OutputChanged, hold_output, plan_and_hold

    src = write_flat(pairs, tmp_path / "in", files=1)
    out = tmp_path / "out"
    fingerprint = plan_rerank(job(tmp_path, tiny_cross_encoder, src)).fingerprint
    (out / "_work").mkdir(parents=True)
    (out / "_work" / "manifest.json").write_text(
        json.dumps({"version": 2, "fingerprint": fingerprint, "join_partitions": 2, "units": None})
    )
    config = job(tmp_path, tiny_cross_encoder, src, output__mode="resume")
    import pipelines.model.scoring

    real = pipelines.model.scoring.describe_model

    def publish_meanwhile(*args, **kwargs):  # the other run publishes while this plan loads the tokenizer
        (out / "_summary.json").write_text(json.dumps({"fingerprint": fingerprint, "rows_written": 30}))
        (out / "_SUCCESS").write_text("")
        shutil.rmtree(out / "_work")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipelines.model.scoring, "describe_model", publish_meanwhile)
    plan = plan_rerank(config)
    monkeypatch.setattr(pipelines.model.scoring, "describe_model", real)
    assert plan.state == "incomplete" and plan.seen == (False, True)
    with pytest.raises(OutputChanged, match="changed while this run was starting"):
        hold_output(plan)
    assert not (out / "_work").exists()  # the lease it took is gone again
    again, lease = plan_and_hold(config, plan)
    assert lease is None and again.already_complete
