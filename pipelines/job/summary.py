"""What a job reports: its summary (`_summary.json`), its errors, and the sums the driver folds from the units'
commit records as they arrive."""

from __future__ import annotations

import collections
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.errors import RerankError

log = logging.getLogger(__name__)


class JobError(RerankError):
    """The job could not finish: its actors died, a unit kept failing, or its own accounting did not add up."""


@dataclass
class JobSummary:
    """What `_summary.json` holds; `one_line()` is what the CLI prints at the end."""

    output_uri: str
    layout: str
    config: dict[str, Any]
    model: dict[str, Any]
    queries: int = 0
    pairs_in: int = 0
    pairs_scored: int = 0
    #: Pairs whose score came from output.score_store (not scored by the model): pairs_in == pairs_scored +
    #: pairs_reused + rejected.
    pairs_reused: int = 0
    windows_scored: int = 0
    rows_written: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    input_files: int = 0
    #: Input rows decoded by the units of the job (those scored before a resume included) per row they hold:
    #: 1.0 when every row was decoded once; more when a slice of a large row group was read out of order.
    read_amplification: float = 0.0
    units: int = 0
    units_resumed: int = 0
    units_retried: int = 0
    wall_time_s: float = 0.0
    pairs_per_s: float = 0.0
    #: Where the wall time went: plan_s, first_actor_s (with its actor_imports_s and model_load_s), scoring_s
    #: (first unit handed out to last commit), reduce_s.
    timings_s: dict[str, float] = field(default_factory=dict)
    scale: dict[str, Any] = field(default_factory=dict)
    #: What shaped the output (the manifest's record, see `job_fingerprint`): a resume of this finished job must
    #: match it, or it is refused.
    fingerprint: dict[str, Any] = field(default_factory=dict)
    #: The files the job published (result files and _rejects/), by path in the output, with their bytes: a resume
    #: of this finished job checks they are all still there.
    result_files: dict[str, int] = field(default_factory=dict)
    #: output.score_store: its uri and namespace, and what the units looked up, found, read and wrote there
    #: (summed over the units of the job, those before a resume included).
    score_store: dict[str, Any] = field(default_factory=dict)
    #: A cascade's stages, in order: name, model, keep, pairs_in, pairs_scored, rejected, rows_kept, wall_time_s,
    #: scoring_s, pairs_per_s, units, units_resumed (`pipelines.job.cascade`); empty for one model.
    stages: list[dict[str, Any]] = field(default_factory=list)

    def one_line(self) -> str:
        rej = (
            f", {self.rejected:,} rejected ({', '.join(f'{k}: {v}' for k, v in self.rejected_by_reason.items())})"
            if self.rejected
            else ""
        )
        resumed = f", {self.units_resumed:,} of {self.units:,} units done before this run" if self.units_resumed else ""
        stages = (
            " (stages: "
            + ", ".join(f"{s['name']} {s['pairs_scored']:,} pairs in {s['wall_time_s']:.1f} s" for s in self.stages)
            + ")"
            if self.stages
            else ""
        )
        reused = f", {self.pairs_reused:,} reused from the score store" if self.score_store else ""
        return (
            f"rerank: {self.queries:,} queries, {self.pairs_scored:,} pairs scored{stages}{reused}, {self.rows_written:,} rows "
            f"written{rej}{resumed} in {self.wall_time_s:.1f} s ({self.pairs_per_s:.1f} pairs/s) -> {self.output_uri}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSummary:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Totals:
    """What the driver keeps of the units' commit records, streamed: sums and, per unit, only whether it left a
    partial or rejects (O(units) small values, no per-bucket maps)."""

    pairs_in: int = 0
    pairs_scored: int = 0
    pairs_reused: int = 0  # from the score store
    store: collections.Counter = field(default_factory=collections.Counter)  # the units' score store counts
    store_bad: dict[str, str] = field(default_factory=dict)  # store files a unit found unusable, and why
    windows_scored: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    rejected_rows: int = 0
    rows: int = 0
    rows_decoded: int = 0
    scored_now: int = 0  # pairs scored by this run (not before a resume)
    units_by_node: collections.Counter = field(default_factory=collections.Counter)
    with_partial: list[tuple[str, int]] = field(default_factory=list)  # (uid, size of its partial file)
    with_rejects: list[str] = field(default_factory=list)
    units_retried: int = 0  # units of this run scored again after a failure (see the model stage's `retried`)
    _seen: set[str] = field(default_factory=set)

    @property
    def units(self) -> int:
        """Units counted (each once)."""
        return len(self._seen)

    def add(self, record: dict[str, Any], now: bool) -> bool:
        """One unit's commit record (`now`: scored by this run); False, and nothing counted, for a unit already
        counted (a stage retried after its commit: the files it rewrote are the same)."""
        if record["uid"] in self._seen:
            self.units_retried += 1
            return False
        self._seen.add(record["uid"])
        self.units_retried += int(now and bool(record.get("retried")))
        self.pairs_in += record["pairs_in"]
        self.pairs_scored += record["pairs_scored"]
        self.pairs_reused += record.get("pairs_reused", 0)
        for key, value in record.get("store", {}).items():
            if key == "bad":
                for uri, why in value.items():
                    if uri not in self.store_bad:
                        self.store_bad[uri] = why
                        log.warning("rerank: score store file not used: %s: %s", uri, why)
            else:
                self.store[key] += value
        self.windows_scored += record.get("windows_scored", 0)
        self.rejected.update(record["rejected"])
        self.rejected_rows += record["rejected_rows"]
        self.rows += record.get("rows", 0)
        self.rows_decoded += record.get("rows_decoded", 0)
        self.units_by_node[record.get("node", "")] += 1
        if now:
            self.scored_now += record["pairs_scored"]
        if record["partial_rows"]:
            self.with_partial.append((record["uid"], record["partial_bytes"]))
        if record["rejected_rows"]:
            self.with_rejects.append(record["uid"])
        return True
