"""The score store: scores kept by pair content, so that a rerun scores only the pairs it has never seen.

A score is a function of the query text, the passage text, the model and the settings that can change a score.
The store keeps float32 scores keyed by a content hash of the query and of the passage, under a *namespace* that
fingerprints the model and those settings (computed by the job, ``pipelines.job.store``; this module only sees
its id). Layout under the store's URI (local or ``s3://``)::

    v1/<namespace>/_namespace.json        what the namespace stands for (model, revision or weights hash,
                                          every score-changing setting), written once
    v1/<namespace>/<ppp>/<hash>.parquet   scores of pairs whose query hash starts with the 3 hex digits ppp;
                                          columns q, p (16-byte BLAKE2b of the query and passage text), s
                                          (float32); sorted by (q, p); row groups cut at query boundaries;
                                          named by the SHA-256 of the file's bytes

Files are immutable and named by content: concurrent writers (two jobs, a retried unit) never overwrite one
another's scores, and a file rewritten under its own name has the same bytes. A reader lists only the partitions
its queries fall in, reads each file's footer and then only the row groups whose statistics (q min/max; p min/max
where a row group holds one query) can hold its keys: the cost of a lookup grows with the pairs looked up and the
files of their partitions, not with the store. ``compact`` merges a partition's files into one and deletes only
the files it merged (a file written meanwhile stays). A file that cannot be read (truncated, a page checksum that
fails) or that belongs to another namespace is never used: it is reported and skipped (``bad``).

No Ray and no model code here.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import StorageConfig
from pipelines.io.storage import Storage

log = logging.getLogger(__name__)

FORMAT = "v1"
KEY_BYTES = 16
PARTITION_DIGITS = 3  # 4,096 partitions by query hash: a unit usually holds few queries, so reads few of them
TAIL_BYTES = 8 * 1024  # first read of a file: its footer and, for a small file, all of it
MIN_GROUP_ROWS = 512  # row groups hold whole queries, at least this many rows (few footer bytes per row)
MAX_GROUP_ROWS = 65_536
NAMESPACE_FILE = "_namespace.json"
SCHEMA = pa.schema([("q", pa.binary(KEY_BYTES)), ("p", pa.binary(KEY_BYTES)), ("s", pa.float32())])
_META_FORMAT, _META_NAMESPACE = b"rerank.score_store", b"rerank.namespace"


def hash_texts(texts: Iterable[str]) -> pa.Array:
    """16-byte BLAKE2b of each text's UTF-8 bytes (each distinct text hashed once)."""
    seen: dict[str, bytes] = {}
    out = []
    for t in texts:
        h = seen.get(t)
        if h is None:
            h = seen[t] = hashlib.blake2b(t.encode("utf-8"), digest_size=KEY_BYTES).digest()
        out.append(h)
    return pa.array(out, pa.binary(KEY_BYTES))


def partition_of(qhash: bytes) -> str:
    return qhash.hex()[:PARTITION_DIGITS]


@dataclass
class StoreStats:
    """What one lookup or write cost and found (summed into a unit's commit record)."""

    looked_up: int = 0
    hits: int = 0
    bytes_read: int = 0
    requests: int = 0
    files_read: int = 0
    pairs_written: int = 0
    files_written: int = 0
    bytes_written: int = 0
    bad: dict[str, str] = field(default_factory=dict)  # file URI -> why it was not used

    def to_record(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "bad"}
        if self.bad:
            out["bad"] = dict(sorted(self.bad.items())[:5])
        return out


class BadFile(Exception):
    """A store file that must not be used (its reason is the message)."""


class ScoreStore:
    """One namespace of a score store (see the module's docstring)."""

    def __init__(self, uri: str, namespace: str, storage: StorageConfig | None = None):
        self.uri = uri.rstrip("/")
        self.storage = Storage.for_uri(self.uri, storage)
        self.namespace = namespace
        self.root = f"{self.storage.path(self.uri)}/{FORMAT}/{namespace}"

    # ------------------------------------------------------------------ the namespace's record

    def declare(self, description: dict[str, Any]) -> str | None:
        """Write the namespace's record once (an exclusive create); if one is there, check it says the same.
        Returns None when the namespace may be used, else the one-line reason it may not (a record that differs:
        files from another model or settings were put under this name)."""
        path = f"{self.root}/{NAMESPACE_FILE}"
        data = json.dumps(description, sort_keys=True, indent=1).encode()
        if self.storage.create_exclusive(path, data) is not None:
            return None
        try:
            there = json.loads(self.storage.fs.cat_file(path))
        except Exception as err:  # noqa: BLE001 - unreadable or not JSON: the namespace cannot be trusted
            return f"its record {self.storage.uri(path)} cannot be read ({type(err).__name__})"
        if there != json.loads(data):
            return f"its record {self.storage.uri(path)} describes another model or settings"
        return None

    # ------------------------------------------------------------------ lookup

    def lookup(self, q: pa.Array, p: pa.Array) -> tuple[np.ndarray, np.ndarray, StoreStats]:
        """Scores of the pairs (q[i], p[i]) found in the store (float32; NaN where missing) and the found mask.
        Reads only the partitions of these queries and the row groups that can hold their keys."""
        stats = StoreStats(looked_up=len(q))
        scores = np.full(len(q), np.nan, dtype=np.float32)
        found = np.zeros(len(q), dtype=bool)
        if not len(q):
            return scores, found, stats
        qs, ps = q.to_pylist(), p.to_pylist()
        wanted: dict[str, dict[bytes, dict[bytes, list[int]]]] = {}
        for i, (qh, ph) in enumerate(zip(qs, ps)):
            wanted.setdefault(partition_of(qh), {}).setdefault(qh, {}).setdefault(ph, []).append(i)

        def one(part: str) -> tuple[dict[tuple[bytes, bytes], float], StoreStats]:
            return self._lookup_partition(part, wanted[part])

        with ThreadPoolExecutor(max_workers=min(8, len(wanted))) as pool:
            for got, part_stats in pool.map(one, sorted(wanted)):
                _add(stats, part_stats)
                for (qh, ph), s in got.items():
                    for i in wanted[partition_of(qh)][qh][ph]:
                        scores[i] = s
                        found[i] = True
        stats.hits = int(found.sum())
        return scores, found, stats

    def _files(self, part: str, stats: StoreStats) -> list[tuple[str, int]]:
        folder = f"{self.root}/{part}"
        stats.requests += 1
        try:
            listed = self.storage.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        files = []
        for info in listed:
            path = info["name"].rstrip("/")
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".parquet") and not name.startswith((".", "_")):
                files.append((path, int(info.get("size") or 0)))
        return sorted(files)

    def _lookup_partition(
        self, part: str, keys: dict[bytes, dict[bytes, list[int]]]
    ) -> tuple[dict[tuple[bytes, bytes], float], StoreStats]:
        stats = StoreStats()
        got: dict[tuple[bytes, bytes], float] = {}
        for attempt in range(2):
            missing = False
            for path, size in self._files(part, stats):
                try:
                    table = self._read_wanted(path, size, keys, stats)
                except FileNotFoundError:  # merged away by a compaction meanwhile: list again
                    missing = True
                    continue
                except BadFile as bad:
                    stats.bad[self.storage.uri(path)] = str(bad)
                    continue
                if table is None:
                    continue
                for qh, ph, s in zip(*(table.column(c).to_pylist() for c in ("q", "p", "s"))):
                    if ph in keys.get(qh, ()):
                        got.setdefault((qh, ph), s)  # the first file (by name) wins: the same answer every time
            if not missing or attempt:
                break
        return got, stats

    def _fetch(self, path: str, start: int, end: int, stats: StoreStats) -> bytes:
        stats.requests += 1
        if self.storage.protocol == "file":
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        else:
            data = self.storage.fs.cat_file(path, start=start, end=end)
        stats.bytes_read += len(data)
        return data

    def _footer(self, path: str, size: int, stats: StoreStats) -> tuple[pq.FileMetaData, bytes, int]:
        """The file's metadata, checked, and the bytes read from its tail (with their start offset)."""
        if size < 12:
            raise BadFile(f"{size} bytes is too small for a Parquet file")
        start = max(0, size - TAIL_BYTES)
        tail = self._fetch(path, start, size, stats)
        if len(tail) != size - start or tail[-4:] != b"PAR1":
            raise BadFile("truncated (no Parquet footer at its end)")
        length = int.from_bytes(tail[-8:-4], "little")
        if length + 8 > size:
            raise BadFile("truncated (its footer is longer than the file)")
        if length + 8 > len(tail):
            tail = self._fetch(path, size - length - 8, start, stats) + tail
            start = size - length - 8
        try:
            md = pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(length + 8) :]))
        except Exception as err:  # noqa: BLE001 - any Arrow error: unusable
            raise BadFile(f"unreadable footer ({type(err).__name__})") from None
        meta = md.metadata or {}
        if meta.get(_META_FORMAT) != FORMAT.encode():
            raise BadFile("not a score store file")
        if meta.get(_META_NAMESPACE) != self.namespace.encode():
            theirs = (meta.get(_META_NAMESPACE) or b"?").decode(errors="replace")
            raise BadFile(f"it belongs to namespace {theirs}, another model or settings")
        if not md.schema.to_arrow_schema().equals(SCHEMA):
            raise BadFile("unexpected columns")
        return md, tail, start

    def _read_wanted(
        self, path: str, size: int, keys: dict[bytes, dict[bytes, list[int]]], stats: StoreStats
    ) -> pa.Table | None:
        md, tail, tail_start = self._footer(path, size, stats)
        stats.files_read += 1
        wanted_q = sorted(keys)
        groups = []
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            qs, ps = rg.column(0).statistics, rg.column(1).statistics
            if qs is None or not qs.has_min_max:
                groups.append(g)
                continue
            lo, hi = qs.min, qs.max
            i = bisect.bisect_left(wanted_q, lo)
            if i == len(wanted_q) or wanted_q[i] > hi:
                continue
            one_query = lo == hi and ps is not None and ps.has_min_max  # its passages' range prunes too
            if one_query and not any(ps.min <= ph <= ps.max for ph in keys[lo]):
                continue
            groups.append(g)
        if not groups:
            return None
        ranges = [_group_range(md.row_group(g)) for g in groups]
        cache = {tail_start: tail}
        for start, end in _coalesce(ranges):
            if start < tail_start:  # what lies in the tail was read with the footer
                cache[start] = self._fetch(path, start, min(end, tail_start), stats)
        source = _Ranges(cache, size)
        try:
            pf = pq.ParquetFile(source, metadata=md, page_checksum_verification=True, pre_buffer=False)
            return pf.read_row_groups(groups, columns=["q", "p", "s"])
        except Exception as err:  # noqa: BLE001 - a damaged page (checksum, decompression): unusable
            raise BadFile(f"damaged data ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None

    # ------------------------------------------------------------------ writing

    def write(self, q: pa.Array, p: pa.Array, s: np.ndarray) -> StoreStats:
        """Write these scores: one new immutable file per partition touched, named by its bytes."""
        stats = StoreStats()
        if not len(q):
            return stats
        table = pa.table({"q": q, "p": p, "s": pa.array(np.asarray(s, dtype=np.float32), pa.float32())})
        parts = np.array([partition_of(h) for h in q.to_pylist()])
        for part in sorted(set(parts.tolist())):
            chunk = table.filter(pa.array(parts == part))
            data = file_bytes(chunk, self.namespace)
            name = hashlib.sha256(data).hexdigest()[:32]
            self.storage.write_bytes(f"{self.root}/{part}/{name}.parquet", data)
            stats.requests += 1
            stats.files_written += 1
            stats.bytes_written += len(data)
            stats.pairs_written += chunk.num_rows
        return stats


def file_bytes(table: pa.Table, namespace: str) -> bytes:
    """A store file: sorted by (q, p), one row per key (the first kept), row groups of whole queries (at least
    MIN_GROUP_ROWS rows each, a query larger than MAX_GROUP_ROWS split), page checksums, the namespace in the
    footer."""
    table = _first_per_key(table.select(["q", "p", "s"]).cast(SCHEMA))
    qs = table.column("q").combine_chunks()
    n = table.num_rows
    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = pc.not_equal(qs[1:], qs[:-1]).to_numpy(zero_copy_only=False)
    bounds, begin = [], 0
    query_starts = np.flatnonzero(starts).tolist() + [n]
    for a in query_starts[1:]:
        while a - begin > MAX_GROUP_ROWS:
            bounds.append((begin, begin + MAX_GROUP_ROWS))
            begin += MAX_GROUP_ROWS
        if a - begin >= MIN_GROUP_ROWS or a == n:
            if a > begin:
                bounds.append((begin, a))
            begin = a
    buf = io.BytesIO()
    with pq.ParquetWriter(
        buf,
        SCHEMA,
        compression="zstd",
        use_dictionary=["q"],
        store_schema=False,
        write_page_checksum=True,
        write_statistics=True,
    ) as writer:
        for a, b in bounds:
            writer.write_table(table.slice(a, b - a), row_group_size=b - a)
        writer.add_key_value_metadata({_META_FORMAT: FORMAT.encode(), _META_NAMESPACE: namespace.encode()})
    return buf.getvalue()


def _first_per_key(table: pa.Table) -> pa.Table:
    """Sorted by (q, p), the first row of every key kept (a stable sort: the earliest file or row wins)."""
    if table.num_rows < 2:
        return table
    table = table.append_column("_i", pa.array(np.arange(table.num_rows)))
    table = table.take(pc.sort_indices(table, sort_keys=[("q", "ascending"), ("p", "ascending"), ("_i", "ascending")]))
    q, p = table.column("q").combine_chunks(), table.column("p").combine_chunks()
    first = np.ones(table.num_rows, dtype=bool)
    first[1:] = ~pc.and_(pc.equal(q[1:], q[:-1]), pc.equal(p[1:], p[:-1])).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(first)).drop_columns(["_i"])


def _group_range(rg: pq.RowGroupMetaData) -> tuple[int, int]:
    start, end = None, 0
    for c in range(rg.num_columns):
        col = rg.column(c)
        first = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
        start = first if start is None else min(start, first)
        end = max(end, first + col.total_compressed_size)
    return int(start or 0), int(end)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class _Ranges(io.RawIOBase):
    """A read-only file made of the byte ranges already fetched (pyarrow reads the row groups from it)."""

    def __init__(self, ranges: dict[int, bytes], size: int):
        self.ranges, self.size_, self.pos = sorted(ranges.items()), size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self.size_ + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n, done = min(len(b), self.size_ - self.pos), 0
        while done < n:
            at = self.pos + done
            piece = next((d[at - s : at - s + n - done] for s, d in self.ranges if s <= at < s + len(d)), b"")
            if not piece:
                raise OSError(f"bytes {at}-{self.pos + n} were not fetched")
            b[done : done + len(piece)] = piece
            done += len(piece)
        self.pos += n
        return n


def _add(into: StoreStats, other: StoreStats) -> None:
    for k, v in other.__dict__.items():
        if k == "bad":
            into.bad.update(v)
        else:
            setattr(into, k, getattr(into, k) + v)


# ---------------------------------------------------------------------------- compaction


@dataclass
class CompactReport:
    namespaces_kept: list[str] = field(default_factory=list)
    namespaces_dropped: list[str] = field(default_factory=list)
    partitions_merged: int = 0
    files_merged: int = 0
    files_written: int = 0
    bad_files_removed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


def namespaces(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """The namespaces a store holds."""
    fs = Storage.for_uri(uri, storage)
    base = f"{fs.path(uri.rstrip('/'))}/{FORMAT}"
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.fs.ls(base, detail=False) if fs.fs.isdir(p))
    except FileNotFoundError:
        return []


def compact(
    uri: str, keep: list[str] | None = None, storage: StorageConfig | None = None, min_files: int = 2
) -> CompactReport:
    """Merge every partition's files into one (per kept namespace) and drop the namespaces not in `keep` (None:
    keep all). Safe beside running jobs: a merged file is written (named by its bytes) before the files it
    merged are deleted, and only those are deleted, so a file a job writes meanwhile stays; a reader that finds a
    file gone lists the partition again. Files that cannot be used (truncated, another namespace) are removed."""
    report = CompactReport()
    base_storage = Storage.for_uri(uri, storage)
    base = f"{base_storage.path(uri.rstrip('/'))}/{FORMAT}"
    for ns in namespaces(uri, storage):
        if keep is not None and ns not in keep:
            log.info("rerank store: dropping namespace %s", ns)
            base_storage.remove(f"{base}/{ns}", within=base)
            report.namespaces_dropped.append(ns)
            continue
        report.namespaces_kept.append(ns)
        store = ScoreStore(uri, ns, storage)
        try:
            parts = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.storage.fs.ls(store.root, detail=False)]
        except FileNotFoundError:
            continue
        for part in sorted(x for x in parts if len(x) == PARTITION_DIGITS):
            _compact_partition(store, part, min_files, report)
    return report


def _compact_partition(store: ScoreStore, part: str, min_files: int, report: CompactReport) -> None:
    stats = StoreStats()
    files = store._files(part, stats)
    report.bytes_before += sum(size for _, size in files)
    if len(files) < min_files:
        report.bytes_after += sum(size for _, size in files)
        return
    tables, merged, bad = [], [], []
    for path, size in files:  # in name order: the first file's copy of a key wins, as for readers
        try:
            store._footer(path, size, stats)  # checked as a reader checks it
            with store.storage.fs.open(path, "rb") as f:
                tables.append(pq.ParquetFile(f, page_checksum_verification=True).read(columns=["q", "p", "s"]))
            merged.append(path)
        except FileNotFoundError:
            continue
        except BadFile as why:
            log.warning("rerank store: removing %s: %s", store.storage.uri(path), why)
            bad.append(path)
        except Exception as err:  # noqa: BLE001 - a damaged page
            log.warning("rerank store: removing %s: damaged data (%s)", store.storage.uri(path), type(err).__name__)
            bad.append(path)
    if tables:
        data = file_bytes(pa.concat_tables(tables), store.namespace)
        name = f"{store.root}/{part}/{hashlib.sha256(data).hexdigest()[:32]}.parquet"
        store.storage.write_bytes(name, data)
        report.files_written += 1
        report.bytes_after += len(data)
        for path in merged:
            if path != name:
                store.storage.remove(path)
        report.files_merged += len(merged)
        report.partitions_merged += 1
    for path in bad:
        store.storage.remove(path)
    report.bad_files_removed += len(bad)


def store_bytes(uri: str, namespace: str, storage: StorageConfig | None = None) -> tuple[int, int]:
    """(files, bytes) of one namespace of a store."""
    store = ScoreStore(uri, namespace, storage)
    try:
        listed = store.storage.fs.find(store.root, detail=True)
    except FileNotFoundError:
        return 0, 0
    sizes = [int(i.get("size") or 0) for p, i in listed.items() if p.endswith(".parquet")]
    return len(sizes), sum(sizes)


__all__ = [
    "ScoreStore",
    "StoreStats",
    "compact",
    "hash_texts",
    "namespaces",
]
