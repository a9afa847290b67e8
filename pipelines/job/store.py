"""The batch job's use of the score store (``pipelines.io.score_store``): its namespace, the lookup before a
unit is tokenised and the write of the scores it computed.

- ``open_store`` (driver, once the actors' device is known): the namespace of a model config, a fingerprint of
  the model (a hub id and its resolved revision, or a local folder's files by content) and of every setting that
  can change a score: the model section minus the settings ``pipelines.job.plan.SCORE_NEUTRAL`` names (one home
  for that policy: what a resume may change is what a stored score may ignore), with ``auto`` backend and dtype
  resolved as the actors will resolve them and the device's type. The same key works for any ModelConfig (a
  cascade's stages each get their own).
- ``lookup_unit`` (read task): the unit's valid pairs -> the ones found in the store (their scores, kept aside)
  and the misses, which alone are tokenised and scored.
- ``commit_store`` (commit task): the misses' new scores written to the store (before the unit commits), the
  reused pairs put back beside them, marked ``reused``.

The store is an accelerator: nothing here decides what is in the output, only where a score comes from.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.config import ModelConfig, StorageConfig
from pipelines.errors import ConfigError
from pipelines.io.score_store import FORMAT, ScoreStore, StoreStats, hash_texts

log = logging.getLogger(__name__)

REUSED = "reused"  # partial rows: the score came from the store (the reduce counts duplicates by it)
_Q, _P = "_store_q", "_store_p"


@dataclass(frozen=True)
class StoreSpec:
    """What the stages need to reach one namespace of a store; small, so Ray passes it inline."""

    uri: str
    namespace: str
    storage: StorageConfig

    def open(self) -> ScoreStore:
        return ScoreStore(self.uri, self.namespace, self.storage)


def namespace_of(model: ModelConfig, device: Any) -> tuple[str, dict[str, Any]]:
    """(namespace id, what it stands for) of a model config scored on `device` (a torch.device)."""
    import torch

    from pipelines.job.plan import comparable
    from pipelines.model import backends
    from pipelines.model.encoding import model_fingerprint

    device = torch.device(device) if isinstance(device, str) else device
    resolved = model
    if "auto" in (model.backend, model.dtype) or model.backend in backends.EXPORTED_BACKENDS:
        resolved, _ = backends.resolve_auto(model, device)
    settings = comparable({"model": resolved.model_dump(mode="json")})["model"]
    settings["device"] = getattr(device, "type", str(device))  # cpu / cuda / mps: not which one
    local = Path(model.name_or_path).expanduser().is_dir()
    weights = model_fingerprint(model.name_or_path, None if local else model.revision)
    if weights == "main (unresolved)":
        raise ConfigError(
            f"output.score_store needs a model whose revision is known: {model.name_or_path!r} has no local "
            "snapshot to resolve; set model.revision to a commit (or use a local folder)"
        )
    if local:  # a local folder is its files, wherever it lies
        settings["name_or_path"] = "(local folder)"
        settings.pop("revision", None)
    description = {"format": FORMAT, "model": settings, "weights": weights}
    ns = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]
    return ns, description


def open_store(uri: str | None, storage: StorageConfig, model: ModelConfig, device: Any) -> StoreSpec | None:
    """The store's namespace for this model, declared (its record written once, or checked); None when no store
    is set, or when the namespace's record says another model (one line: the run goes on without the store)."""
    if not uri:
        return None
    ns, description = namespace_of(model, device)
    spec = StoreSpec(uri.rstrip("/"), ns, storage)
    why = spec.open().declare(description)
    if why is not None:
        log.warning("rerank: score store %s: namespace %s is not used: %s", uri, ns, why)
        return None
    log.info("rerank: score store %s, namespace %s", uri, ns)
    return spec


def lookup_unit(
    spec: StoreSpec, valid: pa.Table, kept: pa.Table
) -> tuple[pa.Table, pa.Table, pa.Table, dict[str, Any]]:
    """(valid misses, their kept columns with the store keys, the hits' kept columns with their score, the
    lookup's record). Only the misses go on to be tokenised and scored."""
    q = hash_texts(valid.column("query").to_pylist())
    p = hash_texts(valid.column("text").to_pylist())
    scores, found, stats = spec.open().lookup(q, p)
    hit, miss = pa.array(found), pa.array(~found)
    reused = kept.filter(hit).append_column("score", pa.array(scores[found], pa.float32()))
    todo = kept.filter(miss).append_column(_Q, q.filter(miss)).append_column(_P, p.filter(miss))
    return valid.filter(miss), todo, reused, stats.to_record()


def commit_store(spec: StoreSpec, scored: pa.Table, reused: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """The unit's new scores (finite, scored by the model) written to the store; returns every scored pair, the
    reused ones included (column `reused`), without the store keys, and the write's record."""
    stats = StoreStats()
    if scored.num_rows:
        stats = spec.open().write(
            scored.column(_Q).combine_chunks(),
            scored.column(_P).combine_chunks(),
            scored.column("score").to_numpy(),
        )
    scored = scored.drop_columns([_Q, _P])
    scored = scored.append_column(REUSED, pa.array(np.zeros(scored.num_rows, dtype=bool)))
    reused = reused.append_column(REUSED, pa.array(np.ones(reused.num_rows, dtype=bool)))
    return pa.concat_tables([scored, reused.select(scored.column_names).cast(scored.schema)]), stats.to_record()
