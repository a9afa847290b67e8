"""A batch job's durable state, next to its output: what a rerun (``output.mode: resume``) reads to finish it.

The output folder of a job::

    part-00000-000.parquet ...   the top-N per query (written by the final reduce, each file atomically)
    _rejects/part-<g>.parquet    rejected rows of a group of units, with their reason (one file per merge group)
    _rejects/reduce-<k>.parquet  copies of a (query_id, doc_id) found in several units (reason duplicate)
    _summary.json, _SUCCESS      written last, only once every count checks out
    _work/lease.json             who runs the job now (host, pid, start time), renewed while it runs: one job per
                                 output folder (see `Lease`)
    _work/manifest.json          what the job is (the config that shapes its output, the model's revision, the
                                 input files by content: S3 ETag, or size + mtime + footer hash) and its units; a
                                 resume must match it. A finished job keeps the same record in _summary.json, so a
                                 resume of it with another config or changed input is refused too.
    _work/partial/<unit>.parquet a unit's partial top-N of every query it holds
    _work/rejects/<unit>.parquet a unit's rejected rows (merged into _rejects/ by the reduce)
    _work/done/<unit>.json       a unit's commit: its counts
    _work/merged/<g>.parquet     a group of units' partials, one row group per reduce bucket (the reduce's first
                                 round, so that each bucket's reducer reads one range per group, not per unit)

A unit is a slice of one input file. It commits by writing its partial file, then its rejects, then its done
marker, each under a name fixed by the unit: a retried or resumed unit rewrites the same names, so nothing is
ever counted twice, and a unit without a done marker is simply redone. Names starting with ``_`` or ``.`` are
skipped by Parquet readers, so readers of the output folder see only finished result files.

Publishing: the result files are written and checked first, then ``_summary.json``, then ``_SUCCESS``; an
overwrite deletes ``_SUCCESS`` before anything else. So ``_SUCCESS`` never exists without every result file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from pipelines.errors import OutputError
from pipelines.storage import Storage

log = logging.getLogger(__name__)

WORK = "_work"
REJECTS = "_rejects"
SUCCESS = "_SUCCESS"
SUMMARY = "_summary.json"

EMPTY, COMPLETE, INCOMPLETE, FOREIGN = "empty", "complete", "incomplete", "foreign"


class Progress:
    """Paths and state of one job's output folder; every read or write of resume state goes through here."""

    def __init__(self, storage: Storage, out_path: str):
        self.storage, self.out = storage, out_path.rstrip("/")

    # ------------------------------------------------------------------ paths

    @property
    def lease_path(self) -> str:
        return f"{self.out}/{WORK}/lease.json"

    @property
    def manifest_path(self) -> str:
        return f"{self.out}/{WORK}/manifest.json"

    def partial_path(self, uid: str) -> str:
        return f"{self.out}/{WORK}/partial/{uid}.parquet"

    def done_path(self, uid: str) -> str:
        return f"{self.out}/{WORK}/done/{uid}.json"

    def rejects_path(self, name: str) -> str:
        return f"{self.out}/{REJECTS}/{name}.parquet"

    def unit_rejects_path(self, uid: str) -> str:
        return f"{self.out}/{WORK}/rejects/{uid}.parquet"

    def merged_path(self, group: int) -> str:
        return f"{self.out}/{WORK}/merged/{group:05d}.parquet"

    def output_path(self, bucket: int, part: int) -> str:
        return f"{self.out}/part-{bucket:05d}-{part:03d}.parquet"

    # ------------------------------------------------------------------ state

    def state(self) -> str:
        """empty (nothing there), complete (_SUCCESS), incomplete (a manifest, no _SUCCESS), foreign (files that
        are not a rerank job's)."""
        fs = self.storage.fs
        if not fs.exists(self.out) or (fs.isdir(self.out) and not fs.ls(self.out)):
            return EMPTY
        if fs.exists(f"{self.out}/{SUCCESS}"):
            return COMPLETE
        if fs.exists(self.manifest_path) or fs.exists(self.lease_path):
            return INCOMPLETE
        return FOREIGN

    def describe_incomplete(self) -> str:
        manifest = self.read_manifest() or {}
        total = len(manifest.get("units", []))
        done = len(self.done_units())
        return f"an earlier run that did not finish ({done:,} of {total:,} input units done, no {SUCCESS})"

    def read_manifest(self) -> dict[str, Any] | None:
        return self.storage.read_json(self.manifest_path)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.storage.write_json(self.manifest_path, manifest, indent=None)  # one line a unit would be 10x larger

    def done_units(self) -> set[str]:
        return {n.removesuffix(".json") for n in self.storage.list_names(f"{self.out}/{WORK}/done", ".json")}

    def read_done(self, uids: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """The commit records of these units, streamed in order (read 16 at a time: there may be tens of thousands
        on S3, and the caller keeps only what it sums)."""
        with ThreadPoolExecutor(max_workers=16) as pool:
            for uid, record in zip(uids, pool.map(lambda u: self.storage.read_json(self.done_path(u)), uids)):
                if record is None:
                    raise OutputError(f"the commit record of unit {uid} disappeared from {self.storage.uri(self.out)}")
                yield uid, record

    # ------------------------------------------------------------------ commits

    def commit_unit(self, uid: str, partial: bytes | None, rejects: bytes | None, record: dict[str, Any]) -> None:
        """The unit's files, then its done marker: only a marker makes the unit count."""
        if partial is not None:
            self.storage.write_bytes(self.partial_path(uid), partial)
        if rejects is not None:
            self.storage.write_bytes(self.unit_rejects_path(uid), rejects)
        self.storage.write_json(self.done_path(uid), record)

    def clear_results(self) -> None:
        """Before the final reduce runs (again): no result file of an interrupted reduce may stay."""
        fs = self.storage.fs
        for p in fs.ls(self.out, detail=False) if fs.exists(self.out) else []:
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("part-") and name.endswith(".parquet"):
                self.storage.remove(p)
        self.storage.remove(f"{self.out}/{REJECTS}")
        self.storage.remove(f"{self.out}/{WORK}/merged")

    def clear_all(self) -> None:
        """output.mode=overwrite: _SUCCESS first (no reader may see it beside half-deleted results), then everything
        but the lease this run holds."""
        log.info("output.mode=overwrite: deleting %s", self.storage.uri(self.out))
        self.storage.remove(f"{self.out}/{SUCCESS}")
        fs = self.storage.fs
        keep = {self.lease_path, f"{self.out}/{WORK}"}
        for top in fs.ls(self.out, detail=False) if fs.exists(self.out) else []:
            top = top.rstrip("/")
            if top == f"{self.out}/{WORK}":
                for p in fs.ls(top, detail=False):
                    if p.rstrip("/") not in keep and not p.rstrip("/").rsplit("/", 1)[-1].startswith(".lease"):
                        self.storage.remove(p)
            else:
                self.storage.remove(top)

    def finish(self, summary: dict[str, Any], lease: Lease | None = None) -> None:
        """_summary.json, then _SUCCESS (every result file is already written and checked); the work folder, the
        lease with it, goes last (a leftover one is harmless). A run that lost its lease publishes nothing."""
        if lease is not None:
            lease.stop_renewing()
            lease.check()
        self.storage.write_json(f"{self.out}/{SUMMARY}", summary)
        self.storage.write_text(f"{self.out}/{SUCCESS}", "")
        self.storage.remove(f"{self.out}/{WORK}")

    def read_summary(self) -> dict[str, Any] | None:
        return self.storage.read_json(f"{self.out}/{SUMMARY}")


class Lease:
    """One job per output folder: ``_work/lease.json``, created atomically (local: exclusive create; S3: a
    conditional PUT, ``If-None-Match: *``), naming its holder, renewed every ``timeout_s / 4`` by a background
    thread with a conditional rewrite (S3 ``If-Match``), so a run that took it over is noticed. A lease not
    renewed for ``timeout_s`` is stale (its run was killed) and may be taken over by a resume or an overwrite; so is
    one whose holder ran on this machine and whose process is gone.
    Clocks of the machines that share an output folder are assumed to agree within a fraction of ``timeout_s``."""

    def __init__(self, progress: Progress, timeout_s: float):
        self.progress, self.timeout_s = progress, timeout_s
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        self._tag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.progress.lease_path

    def _body(self) -> bytes:
        return json.dumps(self.holder | {"renewed_at": time.time(), "timeout_s": self.timeout_s}).encode()

    def acquire(self, takeover: bool) -> None:
        """Take the lease or raise OutputError naming its holder. `takeover`: a stale lease may be taken."""
        storage, uri = self.progress.storage, self.progress.storage.uri(self.progress.out)
        for _ in range(5):
            self._tag = storage.create_exclusive(self.path, self._body())
            if self._tag is not None:
                break
            current = storage.read_tagged(self.path)
            if current is None:  # released meanwhile: try to create it again
                continue
            data, tag = current
            other = _parse_lease(data)
            age = time.time() - other.get("renewed_at", 0.0)
            if age <= self.timeout_s and not holder_gone(other):
                raise OutputError(
                    f"output {uri} is in use by another run ({describe_holder(other, age)}); wait "
                    f"for it to finish, or stop it; one job writes one output folder at a time"
                )
            if not takeover:
                raise OutputError(
                    f"output {uri} holds the lease of a run that stopped ({describe_holder(other, age)}): finish it "
                    "with --resume (output.mode=resume) or start over with output.mode=overwrite"
                )
            self._tag = storage.replace_if(self.path, self._body(), tag)
            if self._tag is not None:
                log.warning("rerank: took over the lease of a run that stopped (%s)", describe_holder(other, age))
                break
        else:
            raise OutputError(f"cannot take the lease of output {uri}: other runs keep changing it; retry")
        self._thread = threading.Thread(target=self._renew, name="rerank-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        storage = self.progress.storage
        last_ok = time.time()
        while not self._stop.wait(max(0.25, self.timeout_s / 4)):
            try:
                tag = storage.replace_if(self.path, self._body(), self._tag or "")
            except OutputError as err:  # a storage hiccup: try again at the next beat, unless too long
                log.warning("rerank: cannot renew the output lease: %s", err)
                if time.time() - last_ok > self.timeout_s:
                    self._lost = f"it could not be renewed for {self.timeout_s:.0f} s ({err})"
                    return
                continue
            if tag is None:
                current = storage.read_tagged(self.path)
                other = _parse_lease(current[0]) if current else {}
                self._lost = f"another run took it over ({describe_holder(other, None)})" if other else "it was deleted"
                log.error("rerank: lost the output lease: %s", self._lost)
                return
            self._tag, last_ok = tag, time.time()

    def check(self) -> None:
        """Raise OutputError if this run no longer holds the lease (it must not publish)."""
        if self._lost:
            raise OutputError(
                f"this run lost the lease of output {self.progress.storage.uri(self.progress.out)}: {self._lost}; "
                "it stops without publishing"
            )

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this run's (a finished job's went with _work/)."""
        self.stop_renewing()
        storage = self.progress.storage
        try:
            current = storage.read_tagged(self.path)
            if current is not None and _parse_lease(current[0]).get("token") == self.holder["token"]:
                storage.remove(self.path)
            work = f"{self.progress.out}/{WORK}"
            left = storage.list_names(work, "")
            if all(n.startswith(".lease") for n in left) and storage.fs.exists(work):
                storage.remove(work)  # a run that stopped before writing anything leaves nothing behind
        except OutputError as err:
            log.warning("rerank: could not release the output lease: %s", err)


def live_lease(progress: Progress, timeout_s: float) -> dict[str, Any] | None:
    """The holder of a lease renewed within timeout_s (a run writing this output now), else None."""
    current = progress.storage.read_tagged(progress.lease_path)
    if current is None:
        return None
    other = _parse_lease(current[0])
    age = time.time() - other.get("renewed_at", 0.0)
    return other | {"age_s": age} if age <= timeout_s and not holder_gone(other) else None


def holder_gone(holder: dict[str, Any]) -> bool:
    """True when the lease's holder ran on this machine and its process is gone (killed): stale at once, without
    waiting for the timeout. A holder on another machine is judged by its renewals alone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe_holder(holder: dict[str, Any], age: float | None) -> str:
    renewed = f", last renewed {age:.0f} s ago" if age is not None else ""
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}"
        f"{renewed}"
    )


def _parse_lease(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}  # a torn or foreign file: treated as a lease renewed at time 0 (stale)


def input_changes(recorded: dict[str, str], current: dict[str, str], uri: Any = str) -> list[str]:
    """Input files added, removed or changed (by content identity) between a recorded job and now."""
    out = [
        f"{uri(p)} changed since the job started"
        for p in sorted(set(recorded) & set(current))
        if recorded[p] != current[p]
    ]
    out += [f"{uri(p)} is new" for p in sorted(set(current) - set(recorded))]
    out += [f"{uri(p)} is gone" for p in sorted(set(recorded) - set(current))]
    return out


def differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two nested dicts, as 'a.b: recorded -> now'."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {_short(a)} (recorded) vs {_short(b)} (now)")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
