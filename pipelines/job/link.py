"""A job run as one stage of a cascade: what it does beyond a plain job (``pipelines.job.cascade`` sets it; the
stages, the reduce and the run read it)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class CascadeLink:
    """What a job run as one stage of a cascade (``pipelines.job.cascade``) does beyond a plain job: columns it
    carries from its input to its output, its own score again under the stage's column, its stage's name on its
    rejects. A plain job's is empty (``NO_LINK``)."""

    carry: tuple[tuple[str, str], ...] = ()  # (input column, output column): query and text for the next stage,
    # the earlier stages' scores
    score_as: str | None = None  # the stage's score column (score_<stage>), beside score
    stage: str | None = None  # the stage's name, in its rejects' stage column

    @property
    def carried_types(self) -> dict[str, pa.DataType]:
        """The output columns carried, with their types (texts large strings, scores float32)."""
        return {dst: pa.large_string() if dst in ("query", "text") else pa.float32() for _, dst in self.carry}


NO_LINK = CascadeLink()
