"""Hostile output settings (issue 23, cases 1 and 2): a second run with a short lease timeout never takes over a
live run's output, a displaced run writes nothing more, and no spelling of the output folder (a symlink to the
input, ``..``, S3 prefix spellings) lets an overwrite delete the input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipelines.errors import OutputError
from pipelines.io.commit import Progress
from pipelines.io.lease import Lease, LeaseLost, check_held
from pipelines.io.storage import Storage
from pipelines.job import hold_output, plan_rerank, run_rerank
from tests.datasets import make_pairs, small_job, write_flat

pytestmark = pytest.mark.timeout(300)

TOP_N = 3


@pytest.fixture(scope="module")
def pairs() -> pd.DataFrame:
    return make_pairs(num_queries=6, per_query=5, seed=5)


def job(tmp_path, model, src, out=None, **extra):
    if out is not None:
        extra["output__uri"] = str(out)
    return small_job(tmp_path, model, src, TOP_N, **extra)


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under a folder (links not followed) by content hash."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if rel not in skip and not name.startswith("."):
                out[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def plant_lease(out: Path, renewed_ago_s: float, **fields) -> dict:
    body = {
        "host": "another-host.example",
        "pid": 4242,
        "started_at": "2026-01-01T00:00:00+00:00",
        "token": "theirs",
        "renewed_at": time.time() - renewed_ago_s,
    } | fields
    (out / "_work").mkdir(parents=True, exist_ok=True)
    (out / "_work" / "lease.json").write_text(json.dumps(body))
    return body


def lease_of(out: Path) -> dict:
    return json.loads((out / "_work" / "lease.json").read_text())


# ---------------------------------------------------------------------------- case 1: the lease


def test_a_second_run_with_a_short_lease_timeout_does_not_take_over_a_live_run(tmp_path, tiny_cross_encoder, pairs):
    """Issue 23 case 1, reproduced: run A holds the output with a 120 s lease and is between renewals (every
    30 s); run B sets output.lease_timeout_s 1 and output.mode overwrite. B used to judge A's lease by its own 1 s,
    take it over and overwrite A's work; now it is refused, naming A, and A's output is untouched."""
    src = write_flat(pairs, tmp_path / "in", files=2)
    out = tmp_path / "out"
    b_config = job(tmp_path, tiny_cross_encoder, src, output__mode="overwrite", output__lease_timeout_s=1)
    # What A has written so far: its manifest, a unit's partial and commit record.
    a_plan = plan_rerank(job(tmp_path, tiny_cross_encoder, src))
    a_plan.progress.write_manifest({"version": 2, "fingerprint": a_plan.fingerprint, "join_partitions": 1, "units": []})
    (out / "_work" / "partial").mkdir(parents=True)
    (out / "_work" / "partial" / "u1.parquet").write_bytes(b"A's partial top-N")
    (out / "_work" / "done").mkdir()
    (out / "_work" / "done" / "u1.json").write_text(json.dumps({"uid": "u1", "pairs_scored": 10}))
    b_planned_early = plan_rerank(b_config)  # B planned before A took the lease: hold_output must refuse it

    a = Lease(Progress(Storage.for_uri(str(out)), str(out)), timeout_s=120.0)
    a.acquire(takeover=False)
    try:
        before = snapshot(out, skip=("_work/lease.json",))
        time.sleep(1.5)  # A's last renewal is now older than B's timeout, well within A's own
        holder = (
            re.escape(f"host {socket.gethostname()}, pid {os.getpid()}, started {a.holder['started_at']}")
            + r", last renewed \d+ s ago, lease timeout 120 s, its process is running on this machine"
        )
        with pytest.raises(OutputError, match=rf"is in use by another run \({holder}\)"):
            run_rerank(b_config)  # refused by the plan, before Ray or any deletion
        with pytest.raises(OutputError, match=rf"is in use by another run \({holder}\)"):
            hold_output(b_planned_early)  # refused when taking the lease
        assert snapshot(out, skip=("_work/lease.json",)) == before  # A's output is untouched
        assert lease_of(out)["token"] == a.token
        a.check(verify=True)  # A still holds it
    finally:
        a.release()


def test_a_holder_whose_process_runs_on_this_machine_is_never_stale(tmp_path):
    out = tmp_path / "out"
    progress = Progress(Storage.for_uri(str(out)), str(out))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        here = {"host": socket.gethostname(), "pid": child.pid, "timeout_s": 1.0}
        plant_lease(out, renewed_ago_s=3600, **here)  # not renewed for an hour, but its process runs
        alive = rf"in use by another run .*its process is running on this machine.*stop it \(pid {child.pid} on this"
        with pytest.raises(OutputError, match=alive):
            Lease(progress, timeout_s=1.0).acquire(takeover=True)
        assert lease_of(out)["token"] == "theirs"

        with open(f"/proc/{child.pid}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        plant_lease(out, renewed_ago_s=3600, **here, proc_start=start + 1)  # the pid now names a later process
        taken = Lease(progress, timeout_s=1.0)
        taken.acquire(takeover=True)
        assert lease_of(out)["token"] == taken.token
        taken.release()

        plant_lease(out, renewed_ago_s=3600, **here, proc_start=start)
        with pytest.raises(OutputError, match="in use by another run"):
            Lease(progress, timeout_s=1.0).acquire(takeover=True)
    finally:
        child.kill()
        child.wait()
    gone = Lease(progress, timeout_s=1000.0)  # its process is gone: stale at once, whatever the timeouts
    gone.acquire(takeover=True)
    gone.release()


def test_staleness_is_the_holders_own_timeout(tmp_path):
    out = tmp_path / "out"
    progress = Progress(Storage.for_uri(str(out)), str(out))
    plant_lease(out, renewed_ago_s=5, timeout_s=30.0)  # another machine's run, renewed 5 s ago, 30 s timeout
    with pytest.raises(
        OutputError,
        match=r"in use by another run \(host another-host.example, pid 4242, started 2026-01-01T00:00:00\+00:00, "
        r"last renewed 5 s ago, lease timeout 30 s\)",
    ):
        Lease(progress, timeout_s=1.0).acquire(takeover=True)
    assert lease_of(out)["token"] == "theirs"
    plant_lease(out, renewed_ago_s=31, timeout_s=30.0)  # stale by its own rule: may be taken over ...
    with pytest.raises(OutputError, match="holds the lease of a run that stopped"):
        Lease(progress, timeout_s=1000.0).acquire(takeover=False)  # ... by a resume or overwrite only
    taken = Lease(progress, timeout_s=1000.0)
    taken.acquire(takeover=True)
    assert lease_of(out)["token"] == taken.token
    taken.release()


def test_a_displaced_run_writes_deletes_and_publishes_nothing(tmp_path):
    """Run A lost its output to run B (planted: B's lease, manifest and a result file). A's commit tasks, its
    overwrite, its manifest, its publishing and its view of the folder's state (what its stop line counts) all
    refuse, and B's files stay as they are."""
    out = tmp_path / "out"
    storage = Storage.for_uri(str(out))
    a = Lease(Progress(storage, str(out)), timeout_s=1.0)
    a.acquire(takeover=False)
    a_view = Progress(storage, str(out), lease=a)
    a_view.write_manifest({"version": 2, "units": [["u1"]]})
    plant_lease(out, renewed_ago_s=0, timeout_s=600.0)  # B took it over
    (out / "_work" / "manifest.json").write_text(json.dumps({"version": 2, "units": None}))
    (out / "part-00000-000.parquet").write_bytes(b"B's result")
    b_files = snapshot(out)

    with pytest.raises(LeaseLost, match=r"lost the lease .*another run took it over \(host another-host.example"):
        check_held(Progress(storage, str(out)), a.token)  # what each commit task does before it writes
    with pytest.raises(LeaseLost, match="lost the lease"):
        a_view.clear_all()  # an overwrite
    with pytest.raises(LeaseLost, match="lost the lease"):
        a_view.write_manifest({"version": 2, "units": []})
    with pytest.raises(LeaseLost, match="lost the lease"):
        a_view.finish({"queries": 0})
    with pytest.raises(LeaseLost):
        a_view.read_manifest()  # the stop line does not count B's state as A's
    a.release()
    assert snapshot(out) == b_files
    assert not (out / "_SUCCESS").exists()
    with pytest.raises(LeaseLost):
        a_view.done_units()


def test_a_run_whose_lease_is_taken_over_mid_job_stops_without_publishing(
    ray_local, tmp_path, tiny_cross_encoder, pairs, monkeypatch
):
    """End to end: after A's first unit commits, another run takes the output over; A's remaining commits and
    its reduce refuse, it raises LeaseLost, and the other run's lease and files stay."""
    from pipelines.job.run import _ProgressLine

    src = write_flat(pairs, tmp_path / "in", files=3)
    out = tmp_path / "out"
    real_show = _ProgressLine.show
    planted = []

    def take_over(self, now, units, pairs_done, last=False):
        if units and not planted:
            planted.append(plant_lease(out, renewed_ago_s=0, timeout_s=600.0))
            (out / "b-was-here.txt").write_text("B's file")
        return real_show(self, now, units, pairs_done, last)

    monkeypatch.setattr(_ProgressLine, "show", take_over)
    with pytest.raises(LeaseLost, match=r"lost the lease .*another run took it over \(host another-host.example"):
        run_rerank(job(tmp_path, tiny_cross_encoder, src, scale__unit_rows=4, scale__num_actors=1))
    assert planted
    assert lease_of(out)["token"] == "theirs"
    assert (out / "b-was-here.txt").read_text() == "B's file"
    assert not (out / "_SUCCESS").exists() and not (out / "_summary.json").exists()
    assert not list(out.glob("part-*.parquet"))


# ---------------------------------------------------------------------------- case 2: paths


def test_an_output_folder_symlinked_to_the_input_is_refused_and_the_input_kept(tmp_path, tiny_cross_encoder, pairs):
    """Issue 23 case 2: output.uri out/link with out/link -> in/data, output.mode overwrite, used to delete the
    input. It is refused before anything is deleted; so is a link to a folder above the input."""
    src = write_flat(pairs, tmp_path / "in" / "data", files=2)
    before = snapshot(tmp_path / "in")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "link"
    link.symlink_to(src, target_is_directory=True)
    config = job(tmp_path, tiny_cross_encoder, src, out=link, output__mode="overwrite")
    really = re.escape(f"output.uri {link} (really {os.path.realpath(src)}) overlaps the input")
    with pytest.raises(OutputError, match=really):
        run_rerank(config)
    above = tmp_path / "out" / "above"
    above.symlink_to(tmp_path / "in", target_is_directory=True)
    with pytest.raises(OutputError, match="overlaps the input"):
        plan_rerank(job(tmp_path, tiny_cross_encoder, src, out=above, output__mode="overwrite"))
    # An input reached through a link, an output inside its real folder.
    via = tmp_path / "via"
    via.symlink_to(src, target_is_directory=True)
    with pytest.raises(OutputError, match="overlaps the input"):
        plan_rerank(job(tmp_path, tiny_cross_encoder, via, out=src / "results", output__mode="overwrite"))
    assert snapshot(tmp_path / "in") == before


@pytest.mark.parametrize("spelling", ["{tmp}/elsewhere/../in/data", "{tmp}/in//data/", "{tmp}/in/./data/sub/.."])
def test_other_spellings_of_the_input_folder_are_refused(tmp_path, tiny_cross_encoder, pairs, spelling):
    src = write_flat(pairs, tmp_path / "in" / "data", files=1)
    before = snapshot(src)
    config = job(tmp_path, tiny_cross_encoder, src, out=spelling.format(tmp=tmp_path), output__mode="overwrite")
    with pytest.raises(OutputError, match="overlaps the input"):
        plan_rerank(config)
    assert snapshot(src) == before


def test_an_overwrite_itself_never_deletes_the_input_or_outside_the_output(tmp_path):
    """The second guard, at the deletion: whatever the plan checked, emptying an output folder that resolves to
    the input is refused before the first deletion (not even _SUCCESS goes), a path that lies outside the output
    is never deleted, and a symlink inside the output is removed as a link, its target kept."""
    data = tmp_path / "in" / "data"
    data.mkdir(parents=True)
    (data / "a.parquet").write_bytes(b"input")
    (data / "_SUCCESS").write_text("")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "link"
    link.symlink_to(data, target_is_directory=True)
    storage = Storage.for_uri(str(link))
    protect = [os.path.realpath(data / "a.parquet"), os.path.realpath(data)]
    with pytest.raises(
        OutputError, match=re.escape(f"refusing to empty output folder {link} (really {os.path.realpath(data)})")
    ):
        Progress(storage, str(link), protect=protect).clear_all()
    with pytest.raises(OutputError, match=r"refusing to delete .*a.parquet: it is, holds or lies in the job's input"):
        storage.remove(str(link / "a.parquet"), within=str(link), protect=protect)
    assert (data / "a.parquet").read_bytes() == b"input" and (data / "_SUCCESS").exists()

    out = tmp_path / "real-out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "inner-link").symlink_to(data, target_is_directory=True)
    (out / "to-input").symlink_to(data, target_is_directory=True)
    (out / "old.parquet").write_bytes(b"old result")
    with pytest.raises(
        OutputError, match=r"refusing to delete .*: it lies at .*/in/data/a.parquet, outside the output"
    ):
        storage.remove(str(out / ".." / "in" / "data" / "a.parquet"), within=str(out))
    Progress(storage, str(out), protect=protect).clear_all()
    assert sorted(p.name for p in out.iterdir()) == []
    assert (data / "a.parquet").read_bytes() == b"input"


def test_s3_prefix_spellings_are_one_prefix():
    s3 = Storage.for_uri("s3://b/x")
    for a, b in [("b/x", "b/x/"), ("b//x", "b/x"), ("b/x/y", "b//x"), ("b/x", "b//x//y/"), ("b/x", "b/y/../x")]:
        assert s3.overlaps(a, b) and s3.overlaps(b, a), (a, b)
    for a, b in [("b/x", "b/xy"), ("b/x", "c/x"), ("b/x/y", "b/x/z")]:
        assert not s3.overlaps(a, b), (a, b)
    assert s3.path("s3://b//x/") == "b//x"
    with pytest.raises(OutputError, match="outside the output folder"):
        s3.check_removal("b/other/f.parquet", "b//x/")
    s3.check_removal("b/x/f.parquet", "b//x/")  # inside: allowed
    with pytest.raises(OutputError, match="job's input"):
        s3.check_removal("b//x/in/f.parquet", "b/x", protect=["b/x/in/"])


@pytest.mark.parametrize("out_uri", ["s3://hostile//in/", "s3://hostile/in/./", "s3://hostile/in/sub/..//"])
def test_s3_output_spelled_as_the_input_prefix_is_refused(s3_server, tmp_path, tiny_cross_encoder, pairs, out_uri):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing", use_listings_cache=False)
    if not fs.exists("hostile"):
        fs.mkdir("hostile")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(pairs, preserve_index=False), buf)
    fs.pipe_file("hostile/in/part-0.parquet", buf.getvalue())
    config = job(
        tmp_path,
        tiny_cross_encoder,
        "s3://hostile/in",
        out=out_uri,
        output__mode="overwrite",
        storage__endpoint_url=s3_server,
    )
    with pytest.raises(OutputError, match="overlaps the input s3://hostile/in"):
        plan_rerank(config)
    assert fs.cat_file("hostile/in/part-0.parquet") == buf.getvalue()
