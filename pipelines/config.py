"""The one typed configuration tree of rerank.

Every YAML file in ``conf/`` maps onto these models field for field. Unknown keys are errors, values are
validated before any Ray work starts, and every field has a documented default unless it is required.
``load_config`` reads a YAML file, applies ``--set a.b=value`` overrides and validates the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class StorageConfig(_Strict):
    """Object-storage settings. Everything left unset comes from the standard AWS environment
    (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, instance roles)."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO).")
    region: str | None = Field(None, description="AWS region of the bucket.")
    profile: str | None = Field(None, description="AWS profile name from ~/.aws/config.")
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    anon: bool = Field(False, description="Anonymous access to public buckets.")


class ModelConfig(_Strict):
    """The scoring model, shared by the batch job, the service and the evaluation."""

    name_or_path: str = Field(..., description="Hugging Face hub id or local folder.")
    kind: Literal["cross-encoder", "bi-encoder"] = Field(
        "cross-encoder",
        description="cross-encoder: sequence classification over (query, passage). "
        "bi-encoder: mean-pooled, L2-normalised embeddings, cosine score.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    max_length: int = Field(512, ge=8, le=32768, description="Max tokens of a (query, passage) pair; the passage is cut.")
    max_query_length: int | None = Field(
        None, ge=4, description="Max tokens kept of a query (default: half of max_length) so a passage always fits."
    )
    batch_size: int = Field(32, ge=1, description="Pairs per forward pass (micro-batch), sorted by token length.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights and activations dtype; float16/bfloat16 are for GPUs."
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:1 ...")
    activation: Literal["none", "sigmoid"] = Field(
        "none",
        description="none: the raw logit (num_labels 1) or the positive-class logit (num_labels 2). "
        "sigmoid: a probability in [0, 1] (softmax of the positive class for num_labels 2).",
    )
    query_template: str = Field("{query}", description="Python format string applied to each query, e.g. 'question:{query}'.")
    passage_template: str = Field("{text}", description="Python format string applied to each passage, e.g. 'passage:{text}'.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust the model.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: the CPUs reserved for the actor).")

    @field_validator("query_template")
    @classmethod
    def _query_placeholder(cls, v: str) -> str:
        if "{query}" not in v:
            raise ValueError("must contain the placeholder {query}")
        return v

    @field_validator("passage_template")
    @classmethod
    def _passage_placeholder(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("must contain the placeholder {text}")
        return v

    @model_validator(mode="after")
    def _query_fits(self) -> "ModelConfig":
        if self.max_query_length is not None and self.max_query_length >= self.max_length:
            raise ValueError("model.max_query_length must be smaller than model.max_length")
        return self


class InputConfig(_Strict):
    uri: str | list[str] = Field(
        ..., description="Parquet candidates: a folder, a glob or a list of files; local paths or s3://bucket/prefix."
    )
    corpus_uri: str | None = Field(
        None, description="Parquet corpus (doc_id, text) to join passage text from when candidates carry only doc_id."
    )

    @field_validator("uri")
    @classmethod
    def _not_empty(cls, v: str | list[str]) -> str | list[str]:
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("must name at least one path")
        return v


class OutputConfig(_Strict):
    uri: str = Field(..., description="Folder (local or s3://) for the top-N Parquet files, _summary.json and _rejects/.")
    top_n: int = Field(10, ge=1, description="Candidates kept per query.")
    mode: Literal["error", "overwrite"] = Field(
        "error", description="error: stop if the output folder is not empty. overwrite: delete it first."
    )
    rows_per_file: int = Field(1_000_000, ge=1, description="Upper bound on rows per output Parquet file.")


class ScaleConfig(_Strict):
    """How the scoring stage is spread over the cluster."""

    num_actors: int = Field(1, ge=1, description="Scoring actors (model replicas); the minimum when max_actors is set.")
    max_actors: int | None = Field(None, ge=1, description="Set to autoscale the actor pool between num_actors and this.")
    num_gpus_per_actor: float | Literal["auto"] = Field(
        "auto", description="GPUs per actor; auto: 1 when the cluster has GPUs, else 0."
    )
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per actor; also its torch thread count on CPU.")
    batch_rows: int = Field(512, ge=1, description="Pairs handed to an actor per call (sorted into micro-batches inside).")
    num_partitions: int | None = Field(
        None, ge=1, description="Shuffle partitions for the flat layout's per-query top-N and the corpus join (default: from input size)."
    )

    @model_validator(mode="after")
    def _range(self) -> "ScaleConfig":
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError("scale.max_actors must be >= scale.num_actors")
        return self


class RayConfig(_Strict):
    """Used only by entry points when they start a local Ray (no RAY_ADDRESS)."""

    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of the local Ray (default: cores + 2, so readers never starve behind actors)."
    )


class RerankJobConfig(_Strict):
    """`rerank run`: candidates in, top-N per query out."""

    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


M = TypeVar("M", bound=BaseModel)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; values are parsed as YAML scalars (``10``, ``true``, ``[a, b]``)."""
    for item in overrides or []:
        parts, value = _parse_override(item)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(err: ValidationError) -> str:
    msgs = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against the README's config reference)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        msgs.append(f"{key}: {msg}")
    return "; ".join(msgs)


def validate_config(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}: {format_validation_error(err)}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (input, output, model, ...)")
    return data


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """Read YAML (optional), apply ``--set`` overrides, validate strictly."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return validate_config(model, data, source=str(path) if path else "config")
