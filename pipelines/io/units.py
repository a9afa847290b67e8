"""Reading the input in proportion to its size: one footer read per file at plan time, units cut along row
groups, and a reader that decodes each row once.

- **Footers**: the plan reads each input file's Parquet footer once (one ranged read of the file's tail; a
  second only when the footer is larger than the first read) and takes from it the schema, the row groups and
  their row counts, and, for the packed layout, each row group's candidate count (the value count of a leaf
  column of the ``candidates`` list: metadata, no text is read).
- **Units** are cut along row groups: a unit is a run of whole row groups of about ``unit_rows`` pairs, or,
  when one row group holds more pairs than that, one slice of it. The slices of one row group form a *chain*.
- **Reading**: `UnitReader` reads a unit's row groups only, and only the job's columns. It keeps its place in
  the row group it read last, so the next slice of a chain continues where the previous one ended: handed a
  chain in order (the scheduler does so), it decodes every row of a large row group once. A slice read out of
  order (a retry on another actor) decodes the rows before it again, which `rows_decoded` counts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import InputError
from pipelines.io import rows as records
from pipelines.io.rows import PACKED, InputLayout
from pipelines.io.storage import FileInfo, Storage

TAIL_BYTES = 64 * 1024  # the first read of a file's tail: footers of files with a few hundred row groups fit
READ_BLOCK_BYTES = 16 * 1024**2  # S3 reads of a unit's rows: ranged GETs of this size at least


@dataclass(frozen=True)
class Footer:
    """One input file's Parquet footer, read once: its metadata and the raw bytes (hashed for the file's
    identity on local disk)."""

    info: FileInfo
    metadata: pq.FileMetaData
    raw: bytes

    @property
    def schema(self) -> pa.Schema:
        return self.metadata.schema.to_arrow_schema()

    def row_group_pairs(self, layout: InputLayout) -> list[tuple[int, int]]:
        """(rows, pairs) of every row group: a flat row is one pair; a packed row holds its candidates, counted
        from the metadata (the value count of a leaf of the candidates list; an empty list counts as one)."""
        md = self.metadata
        out = []
        leaf = None
        if layout.layout == PACKED:
            names = [md.schema.column(j).path for j in range(md.num_columns)]
            leaf = next((j for j, n in enumerate(names) if n.startswith("candidates.")), None)
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            pairs = rg.num_rows if leaf is None else max(rg.num_rows, rg.column(leaf).num_values)
            out.append((rg.num_rows, pairs))
        return out


def read_footer(storage: Storage, info: FileInfo) -> Footer:
    """The file's footer from one ranged read of its tail (two when the footer is larger than TAIL_BYTES)."""
    try:
        size = info.size
        if size < 12:
            raise ValueError(f"{size} bytes is too small for a Parquet file")
        start = max(0, size - TAIL_BYTES)
        tail = _read_range(storage, info.path, start, size)
        if tail[-4:] != b"PAR1":
            raise ValueError("not a Parquet file (no PAR1 magic at its end)")
        footer_len = int.from_bytes(tail[-8:-4], "little")
        if footer_len + 8 > len(tail):
            if footer_len + 8 > size:
                raise ValueError("its footer length is larger than the file")
            tail = _read_range(storage, info.path, size - footer_len - 8, size)
        raw = tail[-(footer_len + 8) :]
        metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + raw))
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - storage errors and ArrowInvalid alike mean "unusable file"
        first = (str(err).strip().splitlines() or [""])[0]
        raise InputError(
            f"cannot read Parquet schema of {storage.uri(info.path)}: {type(err).__name__}: {first}"
        ) from None
    return Footer(info, metadata, raw)


def _read_range(storage: Storage, path: str, start: int, end: int) -> bytes:
    if storage.protocol == "file":
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    return storage.fs.cat_file(path, start=start, end=end)


def read_footers(storage: Storage, files: list[FileInfo]) -> list[Footer]:
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(files)))) as pool:
        return list(pool.map(lambda f: read_footer(storage, f), files))


def identity(storage: Storage, info: FileInfo, footer: Footer | None = None) -> str:
    """What a resume compares to tell a file is unchanged: on S3 its size and ETag (and version id on a versioned
    bucket), from the listing, so no footer is needed; on local disk its size, modification time and a hash of
    its footer (schema, row groups and their statistics)."""
    if not needs_footer_for_identity(storage):
        return f"size={info.size};{info.version}"
    assert footer is not None and footer.info.path == info.path
    return f"size={info.size};{info.version};footer={hashlib.sha1(footer.raw).hexdigest()}"


def needs_footer_for_identity(storage: Storage) -> bool:
    return storage.protocol == "file"


# ---------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """A unit of work: rows [start, end) of one input file, whole row groups or a slice of one; `chain` names the
    row group a slice belongs to ("" for whole row groups), so the scheduler can hand a chain to one reader.
    Small files (and files' small tails) are combined: `more` holds the further (path, start, end) ranges of whole
    row groups of other files that the unit reads after its first, so many small files make few units."""

    uid: str
    path: str
    start: int
    end: int
    chain: str = ""
    more: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def of(cls, path: str, start: int, end: int, chain: str = "") -> Unit:
        import re

        digest = hashlib.sha1(f"{path}|{start}|{end}".encode()).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9]+", "-", path.rsplit("/", 1)[-1].removesuffix(".parquet"))[:40]
        return cls(f"{stem}-{start}-{digest}", path, start, end, chain)

    @classmethod
    def combined(cls, units: list[Unit]) -> Unit:
        """Whole-row-group units of several files as one unit (its uid from every range it reads)."""
        if len(units) == 1:
            return units[0]
        first = units[0]
        ranges = [(u.path, u.start, u.end) for u in units]
        digest = hashlib.sha1(";".join(f"{p}|{s}|{e}" for p, s, e in ranges).encode()).hexdigest()[:16]
        stem = Unit.of(first.path, first.start, first.end).uid.rsplit("-", 2)[0]
        return cls(
            f"{stem}-{first.start}+{len(units) - 1}-{digest}", first.path, first.start, first.end, "", tuple(ranges[1:])
        )

    @property
    def ranges(self) -> list[tuple[str, int, int]]:
        """Every (path, start, end) the unit reads, in order."""
        return [(self.path, self.start, self.end), *self.more]

    @property
    def rows(self) -> int:
        return sum(e - s for _, s, e in self.ranges)

    def to_list(self) -> list:
        out = [self.uid, self.path, self.start, self.end, self.chain]
        return out + [[list(r) for r in self.more]] if self.more else out

    @classmethod
    def from_list(cls, row: list) -> Unit:
        more = tuple(tuple(r) for r in row[5]) if len(row) > 5 else ()
        return cls(*row[:5], more=more)


def plan_units(footers: list[Footer], layout: InputLayout, unit_rows: int) -> tuple[list[Unit], int]:
    """Cut every file into units along its row groups (see the module docstring), then combine consecutive small
    units (small files, files' tails) into units of at most unit_rows pairs; returns the units and the input's
    row count. Zero-row files give no unit."""
    sized, total = _file_units(footers, layout, unit_rows)
    units: list[Unit] = []
    group: list[Unit] = []
    group_pairs = 0
    for unit, pairs in sized:
        if unit.chain or (group and group_pairs + pairs > unit_rows):
            if group:
                units.append(Unit.combined(group))
            group, group_pairs = [], 0
        if unit.chain:
            units.append(unit)
            continue
        group.append(unit)
        group_pairs += pairs
    if group:
        units.append(Unit.combined(group))
    return units, total


def _file_units(footers: list[Footer], layout: InputLayout, unit_rows: int) -> tuple[list[tuple[Unit, int]], int]:
    """Each file's units along its row groups, with their pairs."""
    units: list[tuple[Unit, int]] = []
    total = 0
    for footer in footers:
        path = footer.info.path
        offset, run_start, run_pairs = 0, 0, 0
        for i, (rows, pairs) in enumerate(footer.row_group_pairs(layout)):
            if rows == 0:
                continue
            if pairs > unit_rows:  # a large row group: slices of about unit_rows pairs, one chain
                if run_pairs:
                    units.append((Unit.of(path, run_start, offset), run_pairs))
                slices = math.ceil(pairs / unit_rows)
                step = math.ceil(rows / slices)
                chain = f"{path}#{i}"
                units += [
                    (Unit.of(path, s, min(offset + rows, s + step), chain), pairs // slices)
                    for s in range(offset, offset + rows, step)
                ]
                run_start, run_pairs = offset + rows, 0
            else:
                if run_pairs and run_pairs + pairs > unit_rows:
                    units.append((Unit.of(path, run_start, offset), run_pairs))
                    run_start, run_pairs = offset, 0
                run_pairs += pairs
            offset += rows
        if run_pairs:
            units.append((Unit.of(path, run_start, offset), run_pairs))
        total += offset
    return units, total


# ---------------------------------------------------------------------------- reading


class UnitReader:
    """Reads units' rows, keeping its place in the last row group it read (see the module docstring).
    `rows_decoded` counts every row decoded, the rows skipped to reach a slice read out of order included."""

    BATCH_ROWS = 8192

    def __init__(self, storage: Storage):
        self.storage = storage
        self.rows_decoded = 0
        self._place: tuple[str, int, tuple[str, ...]] | None = None  # (path, next row, columns) of the open chain
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._pending: pa.RecordBatch | None = None  # decoded rows not handed out yet (the next slice's first)
        self._rg_end = 0
        self._file = None
        self._schema_cache: tuple[tuple[str, ...], pa.Schema] | None = None

    def read(self, unit: Unit, columns: list[str]) -> pa.Table:
        """Rows [start, end) of the unit's file (and its further ranges, for a unit of several small files), only
        the given columns, dictionary columns decoded."""
        if unit.more:
            parts = self._read_ranges(unit, columns)
            schema = parts[0].schema
            try:
                return pa.concat_tables([t if t.schema == schema else t.cast(schema) for t in parts])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise InputError(
                    f"the files of unit {unit.uid} ({', '.join(self.storage.uri(p) for p, _, _ in unit.ranges[:3])} "
                    f"...) have columns of types that do not combine: {err}"
                ) from None
        try:
            table = self._read(unit, columns)
        except Exception as err:  # noqa: BLE001 - a damaged file or a storage failure: name the file either way
            self.close()
            first = (str(err).strip().splitlines() or [""])[0]
            raise InputError(
                f"cannot read rows {unit.start:,}-{unit.end:,} of {self.storage.uri(unit.path)}: "
                f"{type(err).__name__}: {first}"
            ) from None
        return records.decode_dictionaries(table)

    def _read_ranges(self, unit: Unit, columns: list[str]) -> list[pa.Table]:
        """A combined unit's ranges (whole row groups of small files), read a few at a time: on S3 each is a GET
        or two, whose latency would add up one after the other."""
        ranges = [Unit(unit.uid, p, s, e) for p, s, e in unit.ranges]
        if len(ranges) < 4 or self.storage.protocol == "file":
            return [self.read(r, columns) for r in ranges]

        def one(r: Unit) -> tuple[pa.Table, int]:
            reader = UnitReader(self.storage)
            return reader.read(r, columns), reader.rows_decoded

        with ThreadPoolExecutor(max_workers=8) as pool:
            done = list(pool.map(one, ranges))
        self.rows_decoded += sum(n for _, n in done)
        return [t for t, _ in done]

    def _read(self, unit: Unit, columns: list[str]) -> pa.Table:
        key = tuple(columns)
        if unit.chain and self._place == (unit.path, unit.start, key) and unit.end <= self._rg_end:
            return self._take(unit.end - unit.start, self._schema(columns))
        self.close()
        self._file = self._open(unit.path)
        pf = pq.ParquetFile(self._file, pre_buffer=True)
        schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
        groups, offset, first_offset = [], 0, None
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < unit.end and offset + n > unit.start:
                groups.append(i)
                first_offset = offset if first_offset is None else first_offset
            offset += n
        if not groups:
            self.close()
            return schema.empty_table()
        self._schema_cache = (key, schema)
        if unit.chain:  # a slice of one row group: stream it, keeping the place for the next slice
            assert len(groups) == 1
            self._rg_end = first_offset + pf.metadata.row_group(groups[0]).num_rows
            self._batches = pf.iter_batches(batch_size=self.BATCH_ROWS, row_groups=groups, columns=columns)
            self._place = (unit.path, first_offset, key)
            if unit.start > first_offset:
                self._take(unit.start - first_offset, schema)  # out of order: decode the rows before it
            return self._take(unit.end - unit.start, schema)
        table = pf.read_row_groups(groups, columns=columns)
        self.rows_decoded += table.num_rows
        self.close()
        return table.slice(unit.start - first_offset, unit.end - unit.start)

    def _schema(self, columns: list[str]) -> pa.Schema:
        assert self._schema_cache is not None and self._schema_cache[0] == tuple(columns)
        return self._schema_cache[1]

    def _take(self, n: int, schema: pa.Schema) -> pa.Table:
        parts, need = [], n
        while need > 0:
            batch = self._pending
            self._pending = None
            if batch is None:
                batch = next(self._batches, None)
                if batch is None:
                    break
                self.rows_decoded += batch.num_rows
            if batch.num_rows > need:
                parts.append(batch.slice(0, need))
                self._pending = batch.slice(need)
                need = 0
            else:
                parts.append(batch)
                need -= batch.num_rows
        path, row, key = self._place
        self._place = (path, row + (n - need), key)
        return pa.Table.from_batches(parts, schema=schema) if parts else schema.empty_table()

    def _open(self, path: str):
        if self.storage.protocol == "file":
            return open(path, "rb")
        # Readahead in large blocks: a small file is one GET, a large one a few large ranged GETs (pyarrow's
        # pre_buffer asks for the column chunks it needs coalesced), never one small request per page.
        return self.storage.fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")

    def close(self) -> None:
        self._place, self._batches, self._pending = None, None, None
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
