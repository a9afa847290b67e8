"""Row-level logic on Arrow tables, free of Ray: input layouts, validation into rejects, and the per-query top-N.

Every input pair ends either in the output or in the rejects with a reason; these functions are where that
accounting is decided, so they are unit-tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.errors import InputError

FLAT = "flat"
PACKED = "packed"

# Reasons a pair is rejected (the `reason` column of _rejects/).
MISSING_QUERY_ID = "missing_query_id"
MISSING_DOC_ID = "missing_doc_id"
EMPTY_QUERY = "empty_query"
EMPTY_TEXT = "empty_text"
NO_CANDIDATES = "no_candidates"
NOT_IN_CORPUS = "doc_not_in_corpus"
NAN_SCORE = "score_not_finite"
MODEL_ERROR = "model_error"  # the model raised on this pair alone (isolated by the model stage); detail: its error
DUPLICATE = "duplicate"
INVALID_UTF8 = "invalid_utf8"
TEXT_TOO_LONG = "text_too_long"

OPTIONAL_COLUMNS = ("first_stage_rank", "first_stage_score")


def _is_id_type(t: pa.DataType) -> bool:
    t = plain_type(t)
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_text_type(t: pa.DataType) -> bool:
    t = plain_type(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def plain_type(t: pa.DataType) -> pa.DataType:
    """A type with every dictionary encoding (pandas categoricals, many writers) replaced by its values' type,
    inside lists and structs too: the input is read as if it had been written plain."""
    if pa.types.is_dictionary(t):
        return plain_type(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        value = t.value_field.with_type(plain_type(t.value_type))
        return pa.list_(value) if pa.types.is_list(t) else pa.large_list(value)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(plain_type(f.type)) for f in t])
    return t


def decode_dictionaries(table: pa.Table) -> pa.Table:
    """The table with dictionary-encoded columns (at any depth) decoded to plain values."""
    plain = pa.schema([f.with_type(plain_type(f.type)) for f in table.schema])
    return table if plain.equals(table.schema) else table.cast(plain)


def layout_differences(a: InputLayout, b: InputLayout, where_a: str, where_b: str) -> list[str]:
    """What differs between two files' layouts, field by field, for an error message."""
    names = {
        "layout": "layout",
        "query_id_type": "query_id type",
        "doc_id_type": "doc_id type",
        "has_text": "a text column",
        "has_first_stage_rank": "a first_stage_rank column",
        "has_first_stage_score": "a first_stage_score column",
    }
    out = []
    for key, label in names.items():
        va, vb = getattr(a, key), getattr(b, key)
        if va != vb:
            if isinstance(va, bool):
                has, lacks = (where_a, where_b) if va else (where_b, where_a)
                out.append(f"{has} has {label} and {lacks} has none")
            else:
                out.append(f"{label} is {va} in {where_a} but {vb} in {where_b}")
    return out


@dataclass(frozen=True)
class InputLayout:
    """What the input schema says: the layout, the id types, and which optional columns travel to the output."""

    layout: str
    query_id_type: pa.DataType
    doc_id_type: pa.DataType
    has_text: bool
    has_first_stage_rank: bool
    has_first_stage_score: bool

    @property
    def reject_schema(self) -> pa.Schema:
        return pa.schema(
            [
                ("query_id", self.query_id_type),
                ("doc_id", self.doc_id_type),
                ("reason", pa.string()),
                ("detail", pa.string()),  # model_error: the model's error line; null for the other reasons
            ]
        )


def detect_layout(schema: pa.Schema, where: str, corpus: bool) -> InputLayout:
    """Flat (a row per pair) or packed (a row per query with a candidates list); raises InputError naming the problem."""
    names = set(schema.names)
    for col in ("query_id", "query"):
        if col not in names:
            raise InputError(
                f"{where}: missing column {col!r} (found {sorted(names)}); see docs/batch-job.md, input formats"
            )
    if not _is_id_type(schema.field("query_id").type):
        raise InputError(f"{where}: query_id must be an integer or string, not {schema.field('query_id').type}")
    if not _is_text_type(schema.field("query").type):
        raise InputError(f"{where}: query must be a string column, not {schema.field('query').type}")

    if "candidates" in names:
        t = schema.field("candidates").type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
            raise InputError(f"{where}: candidates must be list<struct<doc_id, text, ...>>, not {t}")
        fields = {f.name: f.type for f in t.value_type}
        source = "candidates"
        layout = PACKED
    else:
        fields = {n: schema.field(n).type for n in names}
        source = "the table"
        layout = FLAT
    if "doc_id" not in fields:
        raise InputError(
            f"{where}: no doc_id in {source} (found {sorted(fields)}); see docs/batch-job.md, input formats"
        )
    if not _is_id_type(fields["doc_id"]):
        raise InputError(f"{where}: doc_id must be an integer or string, not {fields['doc_id']}")
    has_text = "text" in fields
    if has_text and not _is_text_type(fields["text"]):
        raise InputError(f"{where}: text must be a string column, not {fields['text']}")
    if corpus and has_text:
        raise InputError(f"{where}: candidates carry text and input.corpus_uri is set; remove one of the two")
    if not corpus and not has_text:
        raise InputError(
            f"{where}: no text in {source}; add a text column or set input.corpus_uri to join it from a corpus"
        )
    fields = {n: plain_type(t) for n, t in fields.items()}
    if "first_stage_rank" in fields and not pa.types.is_integer(fields["first_stage_rank"]):
        raise InputError(f"{where}: first_stage_rank must be an integer, not {fields['first_stage_rank']}")
    if "first_stage_score" in fields and not (
        pa.types.is_floating(fields["first_stage_score"]) or pa.types.is_integer(fields["first_stage_score"])
    ):
        raise InputError(f"{where}: first_stage_score must be numeric, not {fields['first_stage_score']}")
    return InputLayout(
        layout=layout,
        query_id_type=plain_type(schema.field("query_id").type),
        doc_id_type=plain_type(fields["doc_id"]),
        has_text=has_text,
        has_first_stage_rank="first_stage_rank" in fields,
        has_first_stage_score="first_stage_score" in fields,
    )


def layout_to_json(layout: InputLayout) -> dict:
    """An InputLayout as JSON (the manifest keeps it, so a resume need not read any footer again)."""
    return {k: str(v) if isinstance(v, pa.DataType) else v for k, v in layout.__dict__.items()}


def layout_from_json(data: dict) -> InputLayout:
    types = {"query_id_type", "doc_id_type"}
    return InputLayout(**{k: pa.type_for_alias(v) if k in types else v for k, v in data.items()})


def check_corpus(schema: pa.Schema, where: str, doc_id_type: pa.DataType) -> None:
    names = set(schema.names)
    for col in ("doc_id", "text"):
        if col not in names:
            raise InputError(f"{where}: corpus is missing column {col!r} (found {sorted(names)})")
    t = plain_type(schema.field("doc_id").type)
    if pa.types.is_integer(t) != pa.types.is_integer(doc_id_type) or not _is_id_type(t):
        raise InputError(f"{where}: corpus doc_id is {t} but the candidates' doc_id is {doc_id_type}; they must match")
    if not _is_text_type(schema.field("text").type):
        raise InputError(f"{where}: corpus text must be a string column, not {schema.field('text').type}")


# ---------------------------------------------------------------------------- normalising


def pair_columns(layout: InputLayout, with_text: bool = True) -> list[str]:
    cols = ["query_id", "query", "doc_id"]
    if with_text:
        cols.append("text")
    cols += [c for c, on in zip(OPTIONAL_COLUMNS, (layout.has_first_stage_rank, layout.has_first_stage_score)) if on]
    return cols


def explode_packed(table: pa.Table, layout: InputLayout) -> tuple[pa.Table, pa.Table]:
    """Packed rows to flat pairs; a query row without candidates becomes a reject (doc_id null)."""
    cands = table.column("candidates").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(cands), 0)
    empty_mask = pc.equal(lengths, 0)
    empty = table.filter(empty_mask).select(["query_id"])
    rejects = pa.table(
        {
            "query_id": empty.column("query_id"),
            "doc_id": pa.nulls(empty.num_rows, layout.doc_id_type),
            "reason": pa.array([NO_CANDIDATES] * empty.num_rows, pa.string()),
            "detail": pa.nulls(empty.num_rows, pa.string()),
        }
    )
    parents = pc.list_parent_indices(cands)
    flat = pc.list_flatten(cands)
    cols = {
        "query_id": pc.take(table.column("query_id"), parents),
        "query": pc.take(table.column("query"), parents),
    }
    for name in pair_columns(layout, with_text=layout.has_text)[2:]:
        cols[name] = flat.field(name)
    return pa.table(cols), rejects


def _drop_invalid_utf8(values: pa.ChunkedArray) -> tuple[pa.Array | None, pa.ChunkedArray]:
    """Parquet readers do not check UTF-8. Returns the mask of rows that are not valid UTF-8 (None when every row
    is) and the column with those values nulled, so string functions can run on it."""
    try:
        values.validate(full=True)
        return None, values
    except pa.ArrowInvalid:
        pass
    bad, clean = [], []
    for v in values.cast(pa.large_binary()).to_pylist():
        try:
            clean.append(None if v is None else v.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            clean.append(None)
            bad.append(True)
    return pa.array(bad), pa.chunked_array([pa.array(clean, values.type)])


def split_rejects(
    pairs: pa.Table, layout: InputLayout, max_text_bytes: int | None = None, corpus: bool = False
) -> tuple[pa.Table, pa.Table]:
    """Valid pairs, and the rest with the first reason that applies. With corpus, a null text means the corpus
    lacks the doc_id; a `_no_candidates` column marks the row a packed query without candidates left."""
    n = pairs.num_rows
    reason = pa.nulls(n, pa.string())
    texts = [c for c in ("query", "text") if c in pairs.column_names and not pa.types.is_null(pairs.column(c).type)]
    # Invalid UTF-8 first: every string function below would fail on it. The bad values are blanked so that
    # they can be handled like any other column value from here on.
    for col in texts:
        invalid, cleaned = _drop_invalid_utf8(pairs.column(col))
        if invalid is not None:
            reason = pc.if_else(invalid, INVALID_UTF8, reason)
            pairs = pairs.set_column(pairs.column_names.index(col), col, cleaned)

    def mark(mask: pa.Array, why: str) -> None:
        nonlocal reason
        mask = pc.fill_null(mask, True)
        reason = pc.if_else(pc.and_(mask, pc.is_null(reason)), why, reason)

    def blank(col: str) -> pa.Array:
        values = pairs.column(col)
        if pa.types.is_null(values.type):
            return pa.array([True] * n)
        return pc.or_(pc.is_null(values), pc.equal(pc.utf8_trim_whitespace(values), ""))

    if "_no_candidates" in pairs.column_names:
        mark(pairs.column("_no_candidates"), NO_CANDIDATES)
        pairs = pairs.drop_columns(["_no_candidates"])
    mark(pc.is_null(pairs.column("query_id")), MISSING_QUERY_ID)
    mark(pc.is_null(pairs.column("doc_id")), MISSING_DOC_ID)
    mark(blank("query"), EMPTY_QUERY)
    if corpus:
        mark(pc.is_null(pairs.column("text")), NOT_IN_CORPUS)
    if "text" in pairs.column_names:
        mark(blank("text"), EMPTY_TEXT)
    if max_text_bytes:
        for col in texts:
            mark(pc.greater(pc.binary_length(pairs.column(col)), max_text_bytes), TEXT_TOO_LONG)
    return _split(pairs, reason, layout)


def split_duplicates(pairs: pa.Table, layout: InputLayout) -> tuple[pa.Table, pa.Table]:
    """The first row of every (query_id, doc_id) is kept; later copies are rejected as duplicates, so that one
    passage never takes two of a query's top-N places."""
    if pairs.num_rows < 2:
        return pairs, layout.reject_schema.empty_table()
    keyed = pa.table(
        {"q": pairs.column("query_id"), "d": pairs.column("doc_id"), "i": pa.array(np.arange(pairs.num_rows))}
    )
    first = keyed.group_by(["q", "d"], use_threads=False).aggregate([("i", "min")]).column("i_min")
    if len(first) == pairs.num_rows:
        return pairs, layout.reject_schema.empty_table()
    keep = np.zeros(pairs.num_rows, dtype=bool)
    keep[first.to_numpy()] = True
    reason = pc.if_else(pa.array(keep), pa.scalar(None, pa.string()), DUPLICATE)
    return _split(pairs, reason, layout)


def _split(pairs: pa.Table, reason: pa.Array, layout: InputLayout) -> tuple[pa.Table, pa.Table]:
    bad = pc.is_valid(reason)
    if not pc.any(bad).as_py():
        return pairs, layout.reject_schema.empty_table()
    rejects = pa.table(
        {
            "query_id": pairs.column("query_id"),
            "doc_id": pairs.column("doc_id"),
            "reason": reason,
            "detail": pa.nulls(pairs.num_rows, pa.string()),
        }
    )
    return pairs.filter(pc.invert(bad)), rejects.filter(bad).cast(layout.reject_schema)


def as_rejects(table: pa.Table, layout: InputLayout) -> pa.Table:
    """A unit's rejects in the reject schema; those of a run before the detail column get it, null."""
    if "detail" not in table.column_names:
        table = table.append_column("detail", pa.nulls(table.num_rows, pa.string()))
    return table.select(layout.reject_schema.names).cast(layout.reject_schema)


def split_model_errors(scored: pa.Table, errors: list[list], layout: InputLayout) -> tuple[pa.Table, pa.Table]:
    """The pairs the model failed on (`errors`: [[pair index, error line], ...] from the model stage) -> rejects
    with reason model_error and the error line as detail."""
    if not errors:
        return scored, layout.reject_schema.empty_table()
    idx = np.asarray([e[0] for e in errors], dtype=np.int64)
    bad = np.zeros(scored.num_rows, dtype=bool)
    bad[idx] = True
    failed = scored.take(pa.array(idx))
    rejects = pa.table(
        {
            "query_id": failed.column("query_id"),
            "doc_id": failed.column("doc_id"),
            "reason": pa.array([MODEL_ERROR] * len(idx), pa.string()),
            "detail": pa.array([str(e[1]) for e in errors], pa.string()),
        }
    )
    return scored.filter(pa.array(~bad)), rejects.cast(layout.reject_schema)


def split_non_finite(scored: pa.Table, layout: InputLayout) -> tuple[pa.Table, pa.Table]:
    """A NaN or infinite score (e.g. float16 overflow) cannot be ranked: reject it rather than rank it anywhere."""
    finite = pc.is_finite(scored.column("score"))
    reason = pc.if_else(finite, pa.scalar(None, pa.string()), NAN_SCORE)
    return _split(scored, reason, layout)


# ---------------------------------------------------------------------------- ranking


def top_n_per_query(scored: pa.Table, n: int, with_rank: bool = True) -> pa.Table:
    """Keep the best n rows of every query, ranked 1..n.

    Order: score (float32) descending, then first-stage rank ascending (missing last), then doc_id ascending, so
    equal scores are broken the same way on every run and every machine.
    """
    if scored.num_rows == 0:
        out = scored
        if with_rank:
            out = out.append_column("rank", pa.array([], pa.int32()))
        return out
    keys = [("query_id", "ascending"), ("score", "descending")]
    sortable = scored
    if "first_stage_rank" in scored.column_names:
        # Missing first-stage ranks sort after every present one.
        fsr = scored.column("first_stage_rank")
        sortable = sortable.append_column("_fsr", pc.fill_null(fsr.cast(pa.int64()), np.iinfo(np.int64).max))
        keys.append(("_fsr", "ascending"))
    keys.append(("doc_id", "ascending"))
    ordered = scored.take(pc.sort_indices(sortable, sort_keys=keys))
    rank = positions_in_groups(ordered.column("query_id"))
    keep = rank <= n
    ordered = ordered.filter(pa.array(keep))
    if with_rank:
        ordered = ordered.append_column("rank", pa.array(rank[keep], pa.int32()))
    return ordered


def best_of_duplicates(scored: pa.Table, layout: InputLayout) -> tuple[pa.Table, pa.Table]:
    """Scored rows of the same (query_id, doc_id) from different units: the best-scored copy stays (ties:
    first-stage rank), the others are rejected as duplicates."""
    if scored.num_rows < 2:
        return scored, layout.reject_schema.empty_table()
    keys = [("query_id", "ascending"), ("doc_id", "ascending"), ("score", "descending")]
    sortable = scored
    if "first_stage_rank" in scored.column_names:
        fsr = pc.fill_null(scored.column("first_stage_rank").cast(pa.int64()), np.iinfo(np.int64).max)
        sortable = sortable.append_column("_fsr", fsr)
        keys.append(("_fsr", "ascending"))
    ordered = scored.take(pc.sort_indices(sortable, sort_keys=keys))
    q, d = ordered.column("query_id").combine_chunks(), ordered.column("doc_id").combine_chunks()
    first = np.ones(ordered.num_rows, dtype=bool)
    first[1:] = ~(pc.and_(pc.equal(q[1:], q[:-1]), pc.equal(d[1:], d[:-1])).to_numpy(zero_copy_only=False))
    if first.all():
        return scored, layout.reject_schema.empty_table()
    return _split(ordered, pc.if_else(pa.array(first), pa.scalar(None, pa.string()), DUPLICATE), layout)


def positions_in_groups(sorted_ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """1, 2, ... within each run of equal ids (the ids sorted so that each id's rows are contiguous)."""
    ids = sorted_ids.combine_chunks() if isinstance(sorted_ids, pa.ChunkedArray) else sorted_ids
    m = len(ids)
    starts = np.ones(m, dtype=bool)
    if m > 1:
        starts[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    start_pos = np.maximum.accumulate(np.where(starts, np.arange(m), 0))
    return (np.arange(m) - start_pos + 1).astype(np.int32)


def output_columns(layout: InputLayout) -> list[str]:
    cols = ["query_id", "doc_id", "rank", "score"]
    if layout.has_first_stage_rank:
        cols.append("first_stage_rank")
    return cols
