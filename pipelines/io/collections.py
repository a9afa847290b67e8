"""Readers for the formats test collections come in.

- TREC qrels (``qid iter docid rel``) and TREC runs (``qid Q0 docid rank score tag``);
- corpora and queries as JSONL or Parquet, including the BEIR layout (``corpus.jsonl``, ``queries.jsonl``,
  ``qrels/<split>.tsv``);
- the SMART format of the classic collections (Cranfield, CISI, MED ...): ``.I``-delimited records.

Everything comes back as plain dicts with string ids, so the rest of the evaluation never cares where a
collection came from. A :class:`Collection` holds the chunk text exactly as the reranker scores it and the LLM
would read it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from pipelines.errors import InputError

log = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]
"""query id -> doc id -> relevance grade (0 = judged not relevant)."""

RankedRun = dict[str, list[tuple[str, float]]]
"""query id -> [(doc id, score), ...] best first."""

#: Cranfield relevance codes (Cleverdon): 1 complete answer .. 4 minimum interest, -1 not relevant.
#: The usual graded gain is 5 - code.
CRANFIELD_GRADES: dict[int, int] = {1: 4, 2: 3, 3: 2, 4: 1, 5: 0, -1: 0}

_ID_KEYS = ("_id", "doc_id", "docid", "id", "query_id", "qid")
_QUERY_TEXT_KEYS = ("text", "query", "question")


@dataclass
class Collection:
    """A test collection: chunk texts, queries and graded judgments, all keyed by string ids."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: Qrels
    name: str = "collection"
    notes: list[str] = field(default_factory=list)

    def judged_queries(self) -> list[str]:
        """Queries that have text and at least one relevant (grade > 0) judgment, in a stable order.

        Only these are evaluated: a query with nothing relevant has no defined recall or nDCG, and BEIR's
        queries.jsonl holds the queries of every split.
        """
        ids = [q for q, judged in self.qrels.items() if q in self.queries and any(g > 0 for g in judged.values())]
        return sorted(ids, key=_natural_key)

    def subset(self, query_ids: list[str]) -> Collection:
        keep = set(query_ids)
        return Collection(
            corpus=self.corpus,
            queries={q: t for q, t in self.queries.items() if q in keep},
            qrels={q: j for q, j in self.qrels.items() if q in keep},
            name=self.name,
            notes=list(self.notes),
        )


def _natural_key(s: str) -> tuple:
    """Sort '2' before '10' and keep non-numeric ids in string order."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s) if p)


def _norm_space(text: str) -> str:
    return " ".join(text.split())


def _open_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file not found: {p}")
    # splitlines() also strips CR of CRLF lines (Cranfield's cranqrel mixes both endings).
    with p.open("r", encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    yield from enumerate(text.splitlines(), 1)


def _grade(label: int, grades: Mapping[int, int] | None) -> int:
    if grades is not None:
        if label not in grades:
            raise InputError(f"relevance label {label} is not in data.relevance_map {dict(grades)}")
        return int(grades[label])
    return max(0, int(label))


def _add_judgment(qrels: Qrels, qid: str, docid: str, grade: int) -> None:
    judged = qrels.setdefault(qid, {})
    # A pair judged twice keeps its highest grade.
    judged[docid] = max(grade, judged.get(docid, grade))


# ---------------------------------------------------------------------------------------------------- TREC


def read_trec_qrels(path: str | Path, grades: Mapping[int, int] | None = None) -> Qrels:
    """TREC qrels: ``qid iter docid rel`` per line, whitespace separated. Negative labels become 0
    (judged not relevant) unless ``grades`` maps labels to gains explicitly."""
    qrels: Qrels = {}
    for n, line in _open_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4:
            raise InputError(f"{path}:{n}: TREC qrels need 4 columns 'qid iter docid rel', got {len(parts)}")
        try:
            label = int(float(parts[3]))
        except ValueError:
            raise InputError(f"{path}:{n}: relevance {parts[3]!r} is not a number") from None
        _add_judgment(qrels, parts[0], parts[2], _grade(label, grades))
    return qrels


def read_beir_qrels(path: str | Path, grades: Mapping[int, int] | None = None) -> Qrels:
    """BEIR qrels: tab-separated ``query-id corpus-id score`` with a header line."""
    qrels: Qrels = {}
    for n, line in _open_lines(path):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) != 3:
            raise InputError(f"{path}:{n}: BEIR qrels need 3 columns 'query-id corpus-id score', got {len(parts)}")
        try:
            label = int(float(parts[2]))
        except ValueError:
            if n == 1:  # the header
                continue
            raise InputError(f"{path}:{n}: score {parts[2]!r} is not a number") from None
        _add_judgment(qrels, parts[0].strip(), parts[1].strip(), _grade(label, grades))
    return qrels


def read_qrels(path: str | Path, grades: Mapping[int, int] | None = None) -> Qrels:
    """TREC qrels (4 columns) or BEIR qrels (3 columns, tab-separated, header), told apart by the columns."""
    for _, line in _open_lines(path):
        if line.strip():
            ncols = len(line.split("\t")) if "\t" in line else len(line.split())
            return read_trec_qrels(path, grades) if ncols == 4 else read_beir_qrels(path, grades)
    raise InputError(f"qrels file {path} is empty")


def trec_order(pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """trec_eval's ranking of a query's results: score descending, ties by doc id descending (string order).

    Sorting input runs this way means the evaluation sees them exactly as trec_eval would. Every score must be
    finite: a sort with a NaN key leaves the rest of the list unsorted, so a NaN or infinite score is refused
    (``InputError``) rather than ranked anywhere; callers check first to name the file, line or model."""
    for doc, score in pairs:
        if not math.isfinite(score):
            raise InputError(f"document {doc} has the non-finite score {score}; it cannot be ranked")
    by_docid_desc = sorted(pairs, key=lambda x: x[0], reverse=True)
    return sorted(by_docid_desc, key=lambda x: -x[1])  # stable: ties keep doc id descending


def read_trec_run(path: str | Path) -> RankedRun:
    """TREC run: ``qid Q0 docid rank score tag``. The rank column is ignored (as trec_eval does); results are
    ordered by score, ties by doc id descending. A doc listed twice for a query keeps its first line. A score
    that is not a finite number (``nan``, ``inf``, ``-inf``) is refused with the file, line and query named:
    it has no place in a ranking, and sorting by it would silently misorder the query's other results."""
    run: dict[str, dict[str, float]] = {}
    for n, line in _open_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise InputError(f"{path}:{n}: TREC run lines need 6 columns 'qid Q0 docid rank score tag'")
        try:
            score = float(parts[4])
        except ValueError:
            raise InputError(f"{path}:{n}: score {parts[4]!r} is not a number") from None
        if not math.isfinite(score):
            raise InputError(
                f"run file {path}, line {n}: query {parts[0]}, document {parts[2]}: score {parts[4]!r} is not a "
                "finite number; a run's scores must be finite to be ranked (fix or drop the line)"
            )
        run.setdefault(parts[0], {}).setdefault(parts[2], score)
    return {q: trec_order(list(docs.items())) for q, docs in run.items()}


# ---------------------------------------------------------------------------------------------------- JSONL / Parquet


def _read_records(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise InputError(f"file not found: {p}")
    suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
    if p.is_dir() or suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if suffix in (".jsonl", ".json", ".jsonl.gz"):
        import gzip

        opener = gzip.open if suffix.endswith(".gz") else open
        out = []
        with opener(p, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise InputError(f"{p}:{n}: not valid JSON: {err.msg}") from None
        return out
    if suffix in (".tsv", ".txt"):
        out = []
        for n, line in _open_lines(p):
            if line.strip():
                parts = line.split("\t", 1)
                if len(parts) != 2:
                    raise InputError(f"{p}:{n}: expected 'id<TAB>text'")
                out.append({"_id": parts[0], "text": parts[1]})
        return out
    raise InputError(f"{p}: unknown format {suffix!r}; use .jsonl, .parquet or .tsv")


def _pick(rec: dict, keys: tuple[str, ...], what: str, path: str | Path):
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    raise InputError(f"{path}: a record has no {what} (looked for {', '.join(keys)}; it has {', '.join(rec)})")


def read_corpus(path: str | Path, title: Literal["prepend", "ignore"] = "prepend") -> dict[str, str]:
    """Corpus records ``{_id|doc_id|id, text, title?}`` from JSONL or Parquet. With ``title='prepend'`` a
    non-empty title is joined before the text (the chunk an LLM would read)."""
    corpus: dict[str, str] = {}
    for rec in _read_records(path):
        doc_id = str(_pick(rec, ("_id", "doc_id", "docid", "id"), "doc id", path))
        text = str(_pick(rec, ("text", "contents", "body"), "text", path))
        t = rec.get("title")
        if title == "prepend" and t and str(t).strip():
            text = f"{str(t).strip()}\n{text}"
        corpus[doc_id] = text
    return corpus


def read_queries(path: str | Path) -> dict[str, str]:
    """Query records ``{_id|query_id|qid|id, text|query}`` from JSONL, Parquet or ``id<TAB>text`` TSV."""
    return {
        str(_pick(rec, ("_id", "query_id", "qid", "id"), "query id", path)): str(
            _pick(rec, _QUERY_TEXT_KEYS, "query text", path)
        )
        for rec in _read_records(path)
    }


def load_beir(folder: str | Path, split: str = "test", title: Literal["prepend", "ignore"] = "prepend") -> Collection:
    """A BEIR dataset folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    d = Path(folder)
    qrels_path = d / "qrels" / f"{split}.tsv"
    for p in (d / "corpus.jsonl", d / "queries.jsonl", qrels_path):
        if not p.is_file():
            raise InputError(f"BEIR folder {d}: {p.relative_to(d)} is missing")
    return Collection(
        corpus=read_corpus(d / "corpus.jsonl", title),
        queries=read_queries(d / "queries.jsonl"),
        qrels=read_beir_qrels(qrels_path),
        name=d.name,
    )


# ---------------------------------------------------------------------------------------------------- SMART

_SMART_FIELD = re.compile(r"^\.([A-Z])(?:\s+(.*))?$")


def read_smart_records(path: str | Path) -> list[tuple[str, dict[str, str]]]:
    """``.I id`` records with ``.T/.A/.B/.W/...`` fields; each field's lines are joined with single spaces."""
    records: list[tuple[str, dict[str, str]]] = []
    fields: dict[str, list[str]] = {}
    current: str | None = None
    for n, line in _open_lines(path):
        m = _SMART_FIELD.match(line.rstrip())
        if m and m.group(1) == "I":
            fields = {}
            records.append(((m.group(2) or "").strip(), fields))  # type: ignore[arg-type]
            current = None
            continue
        if m:
            current = m.group(1)
            fields.setdefault(current, [])
            if m.group(2):
                fields[current].append(m.group(2))
            continue
        if not records:
            if line.strip():
                raise InputError(f"{path}:{n}: SMART file must start with a '.I id' line")
            continue
        if current is not None:
            fields[current].append(line)
    out = []
    for rid, f in records:
        if not rid:
            raise InputError(f"{path}: a '.I' line has no id")
        out.append((rid, {k: _norm_space(" ".join(v)) for k, v in f.items()}))  # type: ignore[arg-type]
    return out


def read_smart_documents(path: str | Path, fields: tuple[str, ...] = ("W",)) -> dict[str, str]:
    """Documents keyed by their ``.I`` number (leading zeros dropped), text = the named fields joined.

    Cranfield's ``.W`` already starts with the title, so the default leaves ``.T`` out."""
    docs = {}
    for rid, f in read_smart_records(path):
        docs[_strip_zeros(rid)] = " ".join(f[k] for k in fields if f.get(k))
    return docs


def read_smart_queries(path: str | Path, ids: Literal["position", "number"] = "position") -> dict[str, str]:
    """Queries from a SMART ``.qry`` file. ``ids='position'``: the query's 1-based position in the file
    (Cranfield's judgments use it; its ``.I`` numbers run 001..365 with gaps). ``'number'``: the ``.I`` number."""
    out = {}
    for pos, (rid, f) in enumerate(read_smart_records(path), 1):
        qid = str(pos) if ids == "position" else _strip_zeros(rid)
        out[qid] = f.get("W", "")
    return out


def read_smart_qrels(path: str | Path, grades: Mapping[int, int] | None = None) -> Qrels:
    """SMART judgments. ``qid docid code`` (Cranfield's cranqrel; codes mapped through ``grades``) or
    ``qid docid 0 0.0`` (CISI/MED .REL: every listed pair is relevant, grade 1). CRLF lines are fine."""
    qrels: Qrels = {}
    for n, line in _open_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 3:
            try:
                label = int(parts[2])
            except ValueError:
                raise InputError(f"{path}:{n}: relevance code {parts[2]!r} is not an integer") from None
            grade = _grade(label, grades)
        elif len(parts) == 4:
            grade = 1
        else:
            raise InputError(f"{path}:{n}: SMART judgments need 'qid docid code' or 'qid docid 0 0.0'")
        _add_judgment(qrels, _strip_zeros(parts[0]), _strip_zeros(parts[1]), grade)
    return qrels


def _strip_zeros(s: str) -> str:
    return str(int(s)) if s.isdigit() else s


def load_smart_collection(
    docs: str | Path,
    queries: str | Path,
    qrels: str | Path,
    *,
    query_ids: Literal["position", "number"] = "position",
    grades: Mapping[int, int] | None = None,
    doc_fields: tuple[str, ...] = ("W",),
    name: str = "smart",
) -> Collection:
    return Collection(
        corpus=read_smart_documents(docs, doc_fields),
        queries=read_smart_queries(queries, query_ids),
        qrels=read_smart_qrels(qrels, grades),
        name=name,
    )


def cranfield_dir() -> Path:
    """The Cranfield 1400 files shipped as package data."""
    return Path(str(resources.files("pipelines") / "data" / "cranfield"))


def load_cranfield(folder: str | Path | None = None) -> Collection:
    """Cranfield 1400: 1,400 abstracts, 225 queries (ids = positions 1..225 in cran.qry), graded judgments
    (gain 5 - code, -1 = not relevant). No licence is stated for the collection; say so with any result."""
    d = Path(folder) if folder else cranfield_dir()
    return load_smart_collection(
        d / "cran.all.1400",
        d / "cran.qry",
        d / "cranqrel",
        query_ids="position",
        grades=CRANFIELD_GRADES,
        name="cranfield",
    )
