"""A batch job's durable state, next to its output: what a rerun (``output.mode: resume``) reads to finish it.

The output folder of a job::

    part-00000-000.parquet ...   the top-N per query (written by the final reduce, each file atomically)
    _rejects/part-<g>.parquet    rejected rows of a group of units, with their reason (one file per merge group)
    _rejects/reduce-<k>.parquet  copies of a (query_id, doc_id) found in several units (reason duplicate)
    _summary.json, _SUCCESS      written last, only once every count checks out; the summary lists every file
                                 published (result_files, with bytes): a resume of the finished job checks them
    _work/lease.json             who runs the job now (host, pid, start time, its lease timeout), renewed while it
                                 runs: one job per output folder (see `pipelines.io.lease`)
    _work/manifest.json          what the job is (the config that shapes its output, the model's revision, the
                                 input files by content: S3 ETag, or size + mtime + footer hash) and its units (and
                                 the unit_rows they were cut with: a resume keeps them); a resume must match it. A finished job keeps the same record in _summary.json, so a
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

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pipelines.errors import OutputError
from pipelines.io.storage import Storage

if TYPE_CHECKING:  # annotation only: the lease builds on this module
    from pipelines.io.lease import Lease

log = logging.getLogger(__name__)

WORK = "_work"
REJECTS = "_rejects"
SUCCESS = "_SUCCESS"
SUMMARY = "_summary.json"

EMPTY, COMPLETE, INCOMPLETE, FOREIGN = "empty", "complete", "incomplete", "foreign"


class Progress:
    """Paths and state of one job's output folder; every read or write of resume state goes through here.

    `lease`: the run's lease of the folder (`pipelines.io.lease.Lease`), when this is the run's own view of it:
    then nothing is written, deleted or read as this run's state once the lease is lost (another run took the
    folder over). `protect`: resolved paths of the job's inputs, which no deletion here may touch (a second guard
    beside the plan's overlap check, see `Storage.remove`)."""

    def __init__(
        self, storage: Storage, out_path: str, lease: Lease | None = None, protect: tuple[str, ...] | list[str] = ()
    ):
        self.storage, self.out = storage, out_path.rstrip("/")
        self.lease, self.protect = lease, tuple(protect)

    def owned(self, verify: bool = False) -> None:
        """Raise OutputError if this run lost the output's lease (`verify`: read the lease file to be sure, before
        anything is deleted or published)."""
        if self.lease is not None:
            self.lease.check(verify=verify)

    def _remove(self, path: str) -> None:
        """Delete inside this output folder only, never the job's inputs (see `Storage.remove`)."""
        self.storage.remove(path, within=self.out, protect=self.protect)

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
        self.owned()
        return self.storage.read_json(self.manifest_path)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.owned()
        self.storage.write_json(self.manifest_path, manifest, indent=None)  # one line a unit would be 10x larger

    def done_units(self) -> set[str]:
        self.owned()
        return {n.removesuffix(".json") for n in self.storage.list_names(f"{self.out}/{WORK}/done", ".json")}

    def read_done(self, uids: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """The commit records of these units, streamed in order (read 16 at a time: there may be tens of thousands
        on S3, and the caller keeps only what it sums)."""
        self.owned()
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
        self.owned(verify=True)
        fs = self.storage.fs
        self.storage.check_clearable(self.out, self.protect)
        for p in fs.ls(self.out, detail=False) if fs.exists(self.out) else []:
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("part-") and name.endswith(".parquet"):
                self._remove(p)
        self._remove(f"{self.out}/{REJECTS}")
        self._remove(f"{self.out}/{WORK}/merged")

    def clear_all(self) -> None:
        """output.mode=overwrite: _SUCCESS first (no reader may see it beside half-deleted results), then everything
        but the lease this run holds. Only a run that still holds the lease deletes, and only inside the output
        folder's own resolved path, never the job's inputs: every deletion is checked before the first one."""
        self.owned(verify=True)
        log.info("output.mode=overwrite: deleting %s", self.storage.uri(self.out))
        self.storage.check_clearable(self.out, self.protect)
        fs = self.storage.fs
        keep = {self.lease_path, f"{self.out}/{WORK}"}
        doomed = []
        for top in fs.ls(self.out, detail=False) if fs.exists(self.out) else []:
            top = top.rstrip("/")
            if top == f"{self.out}/{WORK}":
                for p in fs.ls(top, detail=False):
                    if p.rstrip("/") not in keep and not p.rstrip("/").rsplit("/", 1)[-1].startswith(".lease"):
                        doomed.append(p)
            elif top != f"{self.out}/{SUCCESS}":
                doomed.append(top)
        for p in doomed:
            self.storage.check_removal(p, self.out, self.protect)
        self._remove(f"{self.out}/{SUCCESS}")
        for p in doomed:
            self._remove(p)

    def finish(self, summary: dict[str, Any], lease: Lease | None = None) -> None:
        """_summary.json, then _SUCCESS (every result file is already written and checked); the work folder, the
        lease with it, goes last (a leftover one is harmless). A run that lost its lease publishes nothing: the
        lease file is read once more, after the last renewal, to be sure it is still this run's."""
        lease = lease or self.lease
        if lease is not None:
            lease.stop_renewing()
            lease.check(verify=True)
        self.storage.write_json(f"{self.out}/{SUMMARY}", summary)
        self.storage.write_text(f"{self.out}/{SUCCESS}", "")
        self._remove(f"{self.out}/{WORK}")

    def read_summary(self) -> dict[str, Any] | None:
        return self.storage.read_json(f"{self.out}/{SUMMARY}")


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
