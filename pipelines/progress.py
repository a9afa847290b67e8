"""A batch job's durable state, next to its output: what a rerun (``output.mode: resume``) reads to finish it.

The output folder of a job::

    part-00000-000.parquet ...   the top-N per query (written by the final reduce, each file atomically)
    _rejects/<unit>.parquet      rejected rows of each input unit, with their reason
    _rejects/reduce-<k>.parquet  copies of a (query_id, doc_id) found in several units (reason duplicate)
    _summary.json, _SUCCESS      written last, only once every count checks out
    _work/manifest.json          what the job is (the config that shapes its output, the model's revision, the
                                 input files) and its units; a resume must match it
    _work/partial/<unit>.parquet a unit's partial top-N of every query it holds, one row group per reduce bucket
    _work/done/<unit>.json       a unit's commit: its counts and where each bucket is in its partial file

A unit is a slice of one input file. It commits by writing its partial file, then its rejects, then its done
marker, each under a name fixed by the unit: a retried or resumed unit rewrites the same names, so nothing is
ever counted twice, and a unit without a done marker is simply redone. Names starting with ``_`` or ``.`` are
skipped by Parquet readers, so readers of the output folder see only finished result files.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
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
    def manifest_path(self) -> str:
        return f"{self.out}/{WORK}/manifest.json"

    def partial_path(self, uid: str) -> str:
        return f"{self.out}/{WORK}/partial/{uid}.parquet"

    def done_path(self, uid: str) -> str:
        return f"{self.out}/{WORK}/done/{uid}.json"

    def rejects_path(self, name: str) -> str:
        return f"{self.out}/{REJECTS}/{name}.parquet"

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
        if fs.exists(self.manifest_path):
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
        self.storage.write_json(self.manifest_path, manifest)

    def done_units(self) -> set[str]:
        return {n.removesuffix(".json") for n in self.storage.list_names(f"{self.out}/{WORK}/done", ".json")}

    def read_done(self, uids: list[str]) -> dict[str, dict[str, Any]]:
        """The commit records of these units (read in parallel: there may be thousands on S3)."""
        with ThreadPoolExecutor(max_workers=16) as pool:
            records = list(pool.map(lambda u: self.storage.read_json(self.done_path(u)), uids))
        missing = [u for u, r in zip(uids, records) if r is None]
        if missing:
            raise OutputError(f"the commit record of unit {missing[0]} disappeared from {self.storage.uri(self.out)}")
        return dict(zip(uids, records))

    # ------------------------------------------------------------------ commits

    def commit_unit(self, uid: str, partial: bytes | None, rejects: bytes | None, record: dict[str, Any]) -> None:
        """The unit's files, then its done marker: only a marker makes the unit count."""
        if partial is not None:
            self.storage.write_bytes(self.partial_path(uid), partial)
        if rejects is not None:
            self.storage.write_bytes(self.rejects_path(uid), rejects)
        self.storage.write_json(self.done_path(uid), record)

    def clear_results(self) -> None:
        """Before the final reduce runs (again): no result file of an interrupted reduce may stay."""
        fs = self.storage.fs
        for p in fs.ls(self.out, detail=False) if fs.exists(self.out) else []:
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("part-") and name.endswith(".parquet"):
                self.storage.remove(p)
        for name in self.storage.list_names(f"{self.out}/{REJECTS}", ".parquet"):
            if name.startswith("reduce-"):
                self.storage.remove(f"{self.out}/{REJECTS}/{name}")

    def clear_all(self) -> None:
        log.info("output.mode=overwrite: deleting %s", self.storage.uri(self.out))
        self.storage.remove(self.out)

    def finish(self, summary: dict[str, Any]) -> None:
        """_summary.json, then _SUCCESS; the work folder goes last (a leftover one is harmless)."""
        self.storage.write_json(f"{self.out}/{SUMMARY}", summary)
        self.storage.write_text(f"{self.out}/{SUCCESS}", "")
        self.storage.remove(f"{self.out}/{WORK}")

    def read_summary(self) -> dict[str, Any] | None:
        return self.storage.read_json(f"{self.out}/{SUMMARY}")


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
