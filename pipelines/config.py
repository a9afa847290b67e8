"""The one typed configuration tree of rerank.

Every YAML file in ``conf/`` maps onto these models field for field. Unknown keys are errors, values are
validated before any Ray work starts, and every field has a documented default unless it is required.
``load_config`` reads a YAML file, applies ``--set a.b=value`` overrides and validates the result.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class StorageConfig(_Strict):
    """Object-storage settings. Everything left unset comes from the standard AWS environment
    (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, instance roles)."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO).")
    region: str | None = Field(None, description="AWS region of the bucket.")
    profile: str | None = Field(None, description="AWS profile name from ~/.aws/config.")
    access_key_id: SecretStr | None = Field(
        None,
        description="Deprecated: set AWS_ACCESS_KEY_ID in the environment (or use a profile / instance role). "
        "Accepted only by a local `rerank run`, which moves it into the environment before Ray "
        "starts; a job joining a cluster refuses it, because it would travel in Ray's metadata. Never written out.",
    )
    secret_access_key: SecretStr | None = Field(
        None, description="Deprecated, as access_key_id: set AWS_SECRET_ACCESS_KEY in the environment instead."
    )
    session_token: SecretStr | None = Field(
        None, description="Deprecated, as access_key_id: set AWS_SESSION_TOKEN in the environment instead."
    )
    anon: bool = Field(False, description="Anonymous access to public buckets.")
    retries: int = Field(
        5,
        ge=0,
        le=20,
        description="Retries of one S3 request after a transient error (500, 503 SlowDown, connection reset, "
        "timeout), with botocore's standard exponential backoff (random, up to 2^n s, at most 20 s).",
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to open a connection to S3 before retrying.")
    read_timeout_s: float = Field(
        15.0, gt=0, description="Seconds S3 may stay silent on an open request before it is retried."
    )

    #: The credential fields and the standard AWS environment variables that carry them instead.
    CREDENTIAL_ENV: ClassVar[dict[str, str]] = {
        "access_key_id": "AWS_ACCESS_KEY_ID",
        "secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "session_token": "AWS_SESSION_TOKEN",
    }

    @property
    def has_credentials(self) -> bool:
        return any(getattr(self, name) is not None for name in self.CREDENTIAL_ENV)

    def without_credentials(self) -> StorageConfig:
        """This config with the keys removed: what may travel to Ray workers or be written out."""
        return self.model_copy(update={name: None for name in self.CREDENTIAL_ENV})


class ModelConfig(_Strict):
    """The scoring model, shared by the batch job, the service and the evaluation."""

    name_or_path: str = Field(..., description="Hugging Face hub id or local folder.")
    kind: Literal["cross-encoder", "causal-lm", "bi-encoder"] = Field(
        "cross-encoder",
        description="cross-encoder: sequence classification over (query, passage), encoder or decoder "
        "(e.g. a Llama/Qwen ...ForSequenceClassification). causal-lm: an LLM reranker reading prompt_template; "
        "its raw score is logit(yes_token) - logit(no_token) at the prompt's last token. "
        "bi-encoder: mean-pooled, L2-normalised embeddings, cosine score.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    max_length: int = Field(
        512,
        ge=8,
        le=131072,
        description="Max tokens of a (query, passage) pair or prompt. Nothing is cut from a pair that fits; one "
        "that does not has its passage cut (long_text truncate) or windowed (long_text chunks).",
    )
    max_query_length: int | None = Field(
        None,
        ge=4,
        description="A query is cut only when its pair does not fit, and then to no fewer than this many tokens "
        "(or what the passage leaves): the passage always keeps budget - max_query_length tokens, budget being "
        "max_length less special/template tokens. Default: half the budget (bi-encoder: half of max_length, the "
        "query embedding's length).",
    )
    batch_size: int = Field(
        256,
        ge=1,
        description="Upper bound on pairs per forward pass; the usual limit is max_batch_tokens. Pairs are sorted "
        "by token length first, so a micro-batch holds pairs of similar length.",
    )
    max_batch_tokens: int | Literal["auto"] = Field(
        "auto",
        description="Padded tokens per forward pass (pairs x the longest of them): micro-batches are filled up to "
        "it. auto: 2048 on CPU; on a GPU, from its free memory when the model loads: 0.5 x (free - weights) / "
        "(layers x hidden x 16 x dtype bytes), clamped to 4096-131072 and rounded down to a multiple of 1024. A "
        "pair longer than it still runs, alone.",
    )
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "torch",
        description="torch (SDPA attention), onnx (ONNX Runtime, CPU) or openvino (CPU). onnx and openvino export "
        "the model once into cache_dir. auto: chosen for the device from the processor's flags (GPU: torch; CPU: "
        "the fastest combination measured within 1% nDCG@10 of float32; pipelines.model.backends.resolve_auto), logged "
        "and recorded with the model's description.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "float32",
        description="Compute precision. torch: float32; bfloat16 (CPU: autocast, weights stay float32; GPU: "
        "weights); float16 (GPU only). onnx: float32, int8 (quantisation). openvino: float32, bfloat16 "
        "(precision hint), int8 (static quantisation calibrated on the bundled Cranfield). Other combinations are "
        "refused before the job starts. auto: chosen with the backend (see backend), or the best for a fixed one. "
        "On a GPU, torch with dtype left unset runs bfloat16 where the GPU has it (Ampere and later), else float16; "
        "float32 only when set explicitly.",
    )
    cache_dir: str | None = Field(
        None,
        description="Folder for exported/quantised models (onnx, openvino); default $RERANK_CACHE_DIR or "
        "~/.cache/rerank. Each export happens once per model, backend and dtype, under a file lock.",
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:1 ...")
    activation: Literal["none", "sigmoid"] = Field(
        "none",
        description="none: the raw logit (num_labels 1) or the positive-class logit (num_labels 2). "
        "sigmoid: a probability in [0, 1] (softmax of the positive class for num_labels 2).",
    )
    query_template: str = Field(
        "{query}", description="Python format string applied to each query, e.g. 'question:{query}'."
    )
    passage_template: str = Field(
        "{text}", description="Python format string applied to each passage, e.g. 'passage:{text}'."
    )
    prompt_template: str | None = Field(
        None,
        description="The whole model input as ONE text, with {query} and {text} once each and optionally "
        "{instruction} (query_template and passage_template apply first). causal-lm (required there): tokenized as "
        "written, no special tokens added (write <bos> etc. yourself). cross-encoder: tokenized as one text with "
        "the tokenizer's single-text special tokens, exactly as tokenizer(prompt) (NVIDIA's rerankers: "
        "'question:{query} \\n \\n passage:{text}'); without it a pair is joined as tokenizer(query, passage). "
        "See conf/models/ for presets.",
    )
    instruction: str | None = Field(None, description="The text put in prompt_template's {instruction}.")
    padding_side: Literal["auto", "left", "right"] = Field(
        "auto",
        description="Where a micro-batch pads its shorter rows. auto: causal-lm left (the last position is the "
        "last real token); cross-encoder the side its tokenizer saves (tokenizer_config.json padding_side); "
        "bi-encoder right. Scores do not depend on it: positions count real tokens on either side.",
    )
    yes_token: str = Field(
        "yes", description="causal-lm: the vocabulary entry (exact token, e.g. 'yes' or 'Yes') whose logit scores."
    )
    no_token: str | None = Field(
        "no",
        description="causal-lm: the vocabulary entry subtracted: raw score = logit(yes) - logit(no), [0, 1] score "
        "= P(yes) over the two. null: raw score = logit(yes) alone, [0, 1] = its sigmoid (bge-reranker-v2-gemma).",
    )
    long_text: Literal["truncate", "chunks"] = Field(
        "truncate",
        description="truncate: a passage longer than what fits beside the query is cut. chunks: it is cut into "
        "overlapping windows, each scored with the query, the pair's score the chunk_aggregate of its windows.",
    )
    chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="long_text chunks: passage tokens per window (default and upper bound: what fits beside the "
        "query, so the first window is exactly the pair truncate scores).",
    )
    chunk_stride: int | None = Field(
        None, ge=1, description="long_text chunks: tokens between window starts (default: half a window)."
    )
    chunk_aggregate: Literal["max", "first", "mean"] = Field(
        "max",
        description="long_text chunks: a pair's logits are its best window's by raw score (max, MaxP), its first "
        "window's (first) or the mean over its windows (mean); the activation applies after.",
    )
    max_windows: int = Field(
        64, ge=1, description="long_text chunks: windows scored per pair at most; the rest of a passage is ignored."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust the model.")
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads (default: the CPUs reserved for the actor)."
    )
    embedding_cache: int = Field(
        20_000, ge=0, description="bi-encoder only: passage embeddings each model copy keeps (LRU); 0 disables."
    )

    @field_validator("max_batch_tokens")
    @classmethod
    def _budget(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 16:
            raise ValueError("must be at least 16 tokens, or auto")
        return v

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

    @field_validator("prompt_template")
    @classmethod
    def _prompt_fields(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as err:
            raise ValueError(f"is not a valid format string ({err}); write literal braces as {{{{ and }}}}") from None
        for name in ("query", "text"):
            if fields.count(name) != 1:
                raise ValueError(f"must contain the placeholder {{{name}}} exactly once")
        unknown = sorted(set(fields) - {"query", "text", "instruction"})
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; use {{query}}, {{text}} and {{instruction}}")
        return v

    @model_validator(mode="after")
    def _query_fits(self) -> ModelConfig:
        if self.max_query_length is not None and self.max_query_length >= self.max_length:
            raise ValueError("model.max_query_length must be smaller than model.max_length")
        if self.kind == "causal-lm":
            if not self.prompt_template:
                raise ValueError("model.kind causal-lm needs model.prompt_template (see conf/models/ for presets)")
            if "{instruction}" in self.prompt_template and self.instruction is None:
                raise ValueError("model.prompt_template uses {instruction}: set model.instruction")
            if self.instruction is not None and "{instruction}" not in self.prompt_template:
                raise ValueError("model.instruction is set but model.prompt_template has no {instruction}")
            if self.backend not in ("torch", "auto"):
                raise ValueError("model.kind causal-lm runs on model.backend torch only")
            if self.padding_side == "right":
                raise ValueError("model.kind causal-lm pads left (its score is read at the last position)")
        elif self.kind == "bi-encoder" and (self.prompt_template is not None or self.instruction is not None):
            raise ValueError(
                "model.prompt_template and model.instruction are for cross-encoder and causal-lm models; a bi-encoder "
                "embeds queries and passages apart: use query_template and passage_template"
            )
        if self.kind != "causal-lm" and self.prompt_template is not None:
            if "{instruction}" in self.prompt_template and self.instruction is None:
                raise ValueError("model.prompt_template uses {instruction}: set model.instruction")
            if self.instruction is not None and "{instruction}" not in self.prompt_template:
                raise ValueError("model.instruction is set but model.prompt_template has no {instruction}")
        elif self.kind == "cross-encoder" and self.instruction is not None:
            raise ValueError("model.instruction needs a model.prompt_template with {instruction}")
        if self.chunk_tokens and self.chunk_stride and self.chunk_stride > self.chunk_tokens:
            raise ValueError("model.chunk_stride must be <= model.chunk_tokens (windows must overlap or touch)")
        return self


class InputConfig(_Strict):
    uri: str | list[str] = Field(
        ..., description="Parquet candidates: a folder, a glob or a list of files; local paths or s3://bucket/prefix."
    )
    corpus_uri: str | None = Field(
        None,
        description="Parquet corpus (doc_id, text) to join passage text from when candidates carry only doc_id; "
        "its doc_ids must be unique.",
    )
    max_text_bytes: int = Field(
        8 * 1024**2,
        ge=1,
        description="A query or passage longer than this (UTF-8 bytes) is rejected (reason text_too_long) instead "
        "of tokenised.",
    )

    @field_validator("uri")
    @classmethod
    def _not_empty(cls, v: str | list[str]) -> str | list[str]:
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("must name at least one path")
        return v


class OutputConfig(_Strict):
    uri: str = Field(
        ..., description="Folder (local or s3://) for the top-N Parquet files, _summary.json and _rejects/."
    )
    top_n: int = Field(10, ge=1, description="Candidates kept per query.")
    mode: Literal["error", "overwrite", "resume"] = Field(
        "error",
        description="error: stop if the output folder is not empty. overwrite: delete it first. resume: finish an "
        "interrupted run of the same job (only unfinished input units are redone); a finished one is left as is.",
    )
    rows_per_file: int = Field(1_000_000, ge=1, description="Upper bound on rows per output Parquet file.")
    score_store: str | None = Field(
        None,
        description="Folder (local or s3://) of a score store: scores kept by the content of query and passage "
        "under a namespace of the model and its scoring settings; pairs found there are not scored again, new "
        "scores are added (see docs/score-store.md).",
    )
    lease_timeout_s: float = Field(
        60.0,
        ge=1,
        description="One job per output folder: a running job holds a lease in _work/ (naming its host and pid) and "
        "renews it every lease_timeout_s / 4; any other run is refused. A lease not renewed for this long (its run "
        "was killed) can be taken over by --resume or output.mode=overwrite.",
    )


class ScaleConfig(_Strict):
    """How the scoring stage is spread over the cluster."""

    num_actors: int | Literal["auto"] = Field(
        "auto",
        description="Model actors (model copies) the pool starts with and keeps at least; auto: 1. The pool grows "
        "to max_actors while units wait and the cluster has room (an autoscaler adds nodes for it).",
    )
    max_actors: int | None = Field(
        None,
        ge=1,
        description="Most model actors (default: num_actors when it is a number, else one per GPU the cluster "
        "has or its node types can add, or without GPUs one per num_cpus_per_actor of the cluster's CPUs less the "
        "CPU stages' share). Idle actors go when the work is done.",
    )
    num_gpus_per_actor: float | Literal["auto"] = Field(
        "auto",
        description="GPUs per model actor (fractions share a GPU); auto: 1 when model.device is not cpu and the "
        "cluster has GPUs or an autoscaler can add GPU nodes (its node types), else 0. A job that wants GPUs "
        "waits for them up to actor_start_timeout_s; it never scores on CPUs instead.",
    )
    num_cpus_per_actor: float = Field(
        2.0,
        gt=0,
        description="CPUs reserved per model actor; on CPU also its torch thread count (on 2 cores one actor with "
        "2 threads scored 25% faster than two actors with one thread each). Tokenising runs in the CPU stage.",
    )
    accelerator_type: str | None = Field(
        None, description="Only nodes with this accelerator for the model actors, e.g. H100, A10G (Ray's names)."
    )
    batches_in_flight: int = Field(
        2,
        ge=1,
        description="Units queued at each model actor beyond the one it scores, so it never waits for the next.",
    )
    prepare_cpus: float = Field(
        1.0,
        gt=0,
        description="CPUs per task of the CPU stage (read, validate, tokenise a unit), which runs on every node "
        "with free CPUs, as many tasks at once as they allow.",
    )
    prepare_concurrency: int | None = Field(
        None, ge=1, description="Most CPU-stage tasks at once (default: as many as the cluster's CPUs allow)."
    )
    batch_rows: int = Field(
        4096,
        ge=1,
        description="Pairs per model call of a bi-encoder (cross-encoders and causal-lm score a unit in "
        "micro-batches of model.max_batch_tokens padded tokens).",
    )
    unit_rows: int = Field(
        20_000,
        ge=1,
        description="Input pairs per unit of work: a slice of one file that is read, tokenised, scored and "
        "committed as one. A failure or a resume redoes at most the units in flight.",
    )
    num_partitions: int | None = Field(
        None,
        ge=1,
        description="Buckets of the final per-query top-N (one reduce task and output file set each) and "
        "partitions of the corpus join (default: from input size).",
    )
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each scoring actor needs, e.g. {accelerator_type:A100: 0.01} or a "
        "node label resource, to pin actors to some nodes.",
    )
    max_restarts: int = Field(
        3, ge=0, description="Times Ray restarts a scoring actor whose process or node died (then it is dropped)."
    )
    unit_retries: int = Field(
        3,
        ge=0,
        description="Times a unit's read or commit task is retried after its worker died or a storage error; "
        "past that the job fails. A lost model actor's units wait for its restart (max_restarts bounds a unit that "
        "kills its actor each time).",
    )
    actor_start_timeout_s: float = Field(
        900.0,
        gt=0,
        description="How long to wait for the first model actor to be placed and load its model (an autoscaling "
        "cluster may have to add a GPU node first); then the job stops saying what it lacked, its finished units "
        "kept for --resume.",
    )
    stall_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="The job stops when no unit has moved through any stage for this long (every model actor "
        "lost and none can be placed again, or a cluster with no room left), its finished units kept for "
        "--resume. Raise it if one unit takes longer than this to score.",
    )

    @model_validator(mode="after")
    def _range(self) -> ScaleConfig:
        if isinstance(self.num_actors, int) and self.num_actors < 1:
            raise ValueError("scale.num_actors must be >= 1 or 'auto'")
        if self.max_actors is not None and isinstance(self.num_actors, int) and self.max_actors < self.num_actors:
            raise ValueError("scale.max_actors must be >= scale.num_actors")
        return self


class RayConfig(_Strict):
    """Used only by entry points when they start a local Ray (no RAY_ADDRESS)."""

    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of the local Ray (default: cores + 2, so readers never starve behind actors).",
    )
    host: str = Field(
        "127.0.0.1",
        description="Node address of the local Ray. 127.0.0.1 (default) or another loopback address: every port it "
        "opens (GCS, raylet, object manager, workers, agents, metrics export) binds loopback only. Another address "
        "of this machine makes the node reachable from the network, and Ray then binds several ports on all "
        "interfaces: only for a trusted network. Serve's proxy binds serve.host either way.",
    )

    @field_validator("host")
    @classmethod
    def _host_is_an_address(cls, v: str) -> str:
        import ipaddress

        v = v.strip()
        if v == "localhost":
            return v
        try:
            ip = ipaddress.ip_address(v.strip("[]"))
        except ValueError:
            raise ValueError(
                f"{v!r} is not an IP address: use 127.0.0.1 (default) or an address of this machine"
            ) from None
        if ip.is_unspecified:
            raise ValueError(
                f"{v} is not a node address: Ray needs the address other processes reach this node at (e.g. this "
                "machine's IP), not a wildcard"
            )
        return v


# ---------------------------------------------------------------------------- cascades (job, service, eval)


class ServeAutoscalingConfig(_Strict):
    """Ray Serve autoscaling of the service's replicas (each replica holds one copy of the model)."""

    min_replicas: int = Field(
        1, ge=0, description="Replicas kept up when idle; 0 scales to zero (first request waits for a model load)."
    )
    max_replicas: int = Field(
        2, ge=1, description="Upper bound; each replica needs num_cpus/num_gpus_per_replica free in the cluster."
    )
    target_ongoing_requests: float = Field(
        16.0,
        gt=0,
        description="Ongoing requests per replica the autoscaler aims for. Lower: more replicas, lower latency; "
        "higher: fuller batches, fewer replicas. Keep it below serve.max_ongoing_requests.",
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must stay high this long before a replica is added.")
    downscale_delay_s: float = Field(
        300.0, ge=0, description="Load must stay low this long before a replica is removed."
    )

    @model_validator(mode="after")
    def _range(self) -> ServeAutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("serve.autoscaling.max_replicas must be >= serve.autoscaling.min_replicas")
        return self


class ServeDeploymentConfig(_Strict):
    """rerank serve: the Ray Serve deployment of one model of `rerankers:` (an entry's `serve:`, or a cascade stage's
    that gives its own model). Every key left unset takes the top-level `serve:` value."""

    num_replicas: int | None = Field(
        None, ge=1, description="Fixed replicas of this model (replaces a top-level autoscaling)."
    )
    autoscaling: ServeAutoscalingConfig | None = Field(
        None, description="Autoscale this model's replicas (replaces a top-level num_replicas)."
    )
    num_cpus_per_replica: float | None = Field(None, gt=0, description="CPUs per replica of this model.")
    num_gpus_per_replica: float | Literal["auto"] | None = Field(
        None, description="GPUs per replica of this model (fractions share a GPU); auto as serve.num_gpus_per_replica."
    )
    replica_resources: dict[str, PositiveFloat] | None = Field(
        None, description="Custom Ray resources per replica of this model."
    )
    max_batch_pairs: int | None = Field(None, ge=1, description="Pairs per model call of this model.")
    batch_wait_timeout_s: float | None = Field(
        None, ge=0, description="How long a call of this model short of max_batch_pairs waits for more requests."
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests a replica of this model works on at once."
    )
    max_queued_requests: int | None = Field(
        None, ge=-1, description="Requests waiting for a replica of this model; past it: 503 + Retry-After."
    )
    max_queued_pairs: int | None = Field(
        None, ge=1, description="Pairs admitted into a replica of this model and not yet scored; past it: 503."
    )
    request_timeout_s: float | None = Field(
        None, gt=0, description="Longest wait for this model's scores in one request (408 past it)."
    )
    health_check_period_s: float | None = Field(None, gt=0, description="Health check period of this model's replicas.")
    health_check_timeout_s: float | None = Field(
        None, gt=0, description="Health check timeout of this model's replicas."
    )


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class CascadeStage(_Strict):
    """One stage of a cascade: a reranker over what the stage before it kept for each query (the first stage:
    over all the candidates). Give the stage its `model`, or (in `rerank serve` and `rerank eval`) name an entry
    of `rerankers:` as `reranker` to use that entry's model (and, in the service, its deployment)."""

    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        max_length=64,
        description="The stage's label: its score column (score_<name>) in the job's output, its line in summaries "
        "and reports. Default: the reranker it names, else stage1, stage2, ...",
    )
    model: ModelConfig | None = Field(None, description="The stage's model (the same section as model:).")
    reranker: str | None = Field(
        None,
        description="rerank serve / rerank eval: the name of an entry of rerankers: whose model this stage runs "
        "(instead of model).",
    )
    keep: int | None = Field(
        None,
        ge=1,
        description="Candidates per query this stage passes on to the next (its top M, over all of a query's "
        "candidates). Required on every stage but the last, whose cut is output.top_n (the job), the request's "
        "top_n (the service) or N (the eval).",
    )
    scale: ScaleConfig | None = Field(
        None,
        description="rerank run: this stage's actor pool and resources: the keys it sets, over the job's scale "
        "section.",
    )
    serve: ServeDeploymentConfig | None = Field(
        None,
        description="rerank serve: the deployment of a stage that gives its own model (default: the top-level "
        "serve section); a stage naming a reranker runs on that entry's deployment.",
    )

    @model_validator(mode="after")
    def _one_model(self) -> CascadeStage:
        if (self.model is None) == (self.reranker is None):
            raise ValueError("a cascade stage gives its model, or names a reranker (rerank serve/eval), not both")
        return self


def check_cascade(stages: list[CascadeStage], where: str = "cascade") -> list[CascadeStage]:
    """The rules every cascade follows, in one line each: stage names unique (defaults filled in), `keep` on every
    stage but the last, each `keep` no larger than the one before. Returns the stages with their names set."""
    if not stages:
        raise ValueError(f"{where}: give at least one stage")
    named: list[CascadeStage] = []
    for i, stage in enumerate(stages, 1):
        name = stage.name or stage.reranker or f"stage{i}"
        named.append(stage if stage.name == name else stage.model_copy(update={"name": name}))
    names = [s.name for s in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: the stage name {dupes[0]!r} is used twice; give the stages distinct names")
    for i, stage in enumerate(named[:-1], 1):
        if stage.keep is None:
            raise ValueError(f"{where}: stage {i} ({stage.name}) needs keep: how many candidates per query go on")
    if named[-1].keep is not None:
        raise ValueError(
            f"{where}: the last stage ({named[-1].name}) takes no keep: its cut is the top_n of the output or request"
        )
    keeps = [s.keep for s in named[:-1]]
    for i in range(1, len(keeps)):
        if keeps[i] > keeps[i - 1]:  # type: ignore[operator]
            raise ValueError(
                f"{where}: stage {i + 1} ({named[i].name}) keeps {keeps[i]}, more than the {keeps[i - 1]} stage {i} "
                f"({named[i - 1].name}) passed on; each keep must be no larger than the one before"
            )
    return named


class RerankerSpec(_Strict):
    """One reranker of a side-by-side evaluation."""

    name: str = Field(
        ...,
        pattern=NAME_PATTERN,
        max_length=64,
        description="Its name: the request's model field in the service; the label in the eval's report, run files "
        "(runs/<name>_k<K>.run) and job folder.",
    )
    model: ModelConfig | None = Field(None, description="The reranker (the same section as rerank run's model).")
    cascade: list[CascadeStage] | None = Field(
        None,
        description="A named cascade instead of a model: stages [{reranker: <name>, keep: M}, ...] over other "
        "entries (or stages with their own model).",
    )
    serve: ServeDeploymentConfig | None = Field(
        None,
        description="rerank serve: this model's own deployment (replicas, CPUs, GPUs, batching, queues); unset keys "
        "take the top-level serve section. Ignored by rerank eval, so one file serves both.",
    )

    @model_validator(mode="after")
    def _model_or_cascade(self) -> RerankerSpec:
        if (self.model is None) == (self.cascade is None):
            raise ValueError(f"rerankers: {self.name} gives a model or a cascade, not both")
        if self.cascade is not None:
            named = check_cascade(self.cascade, f"rerankers: {self.name}: cascade")
            if named != self.cascade:
                object.__setattr__(self, "cascade", named)
        return self


def check_rerankers(specs: list[RerankerSpec]) -> None:
    """A `rerankers:` list (service and eval): names unique; a cascade's stages name entries that exist and hold a
    model (a cascade does not nest another)."""
    names = [r.name for r in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"rerankers: the name {dupes[0]!r} is used twice")
    models = {r.name for r in specs if r.model is not None}
    for spec in specs:
        for stage in spec.cascade or []:
            if stage.reranker is not None and stage.reranker not in models:
                what = "is a cascade (cascades do not nest)" if stage.reranker in names else "is not in rerankers"
                raise ValueError(
                    f"rerankers: {spec.name}: stage {stage.name} names {stage.reranker!r}, which {what}; "
                    f"name one of {sorted(models)}"
                )


class RerankJobConfig(_Strict):
    """`rerank run`: candidates in, top-N per query out."""

    input: InputConfig
    output: OutputConfig
    model: ModelConfig | None = Field(None, description="The reranker (or give several stages as cascade).")
    cascade: list[CascadeStage] | None = Field(
        None,
        description="Rerankers in order, each over the candidates the one before kept per query "
        "([{name, model, keep, scale}, ...]); instead of model.",
    )
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _model_or_cascade(self) -> RerankJobConfig:
        if (self.model is None) == (self.cascade is None):
            raise ValueError("give the reranker as model, or several stages as cascade: [{name, model, keep}, ...]")
        if self.cascade is not None:
            named = check_cascade(self.cascade)
            for stage in named:
                if stage.serve is not None:
                    raise ValueError(
                        f"cascade: stage {stage.name} has serve:, which is for rerank serve; give rerank run's "
                        "stage its actor pool as scale:"
                    )
                if stage.reranker is not None:
                    raise ValueError(
                        f"cascade: stage {stage.name} names reranker {stage.reranker!r}, but rerank run has no "
                        "rerankers list: give the stage its model"
                    )
            last_keep = named[-2].keep if len(named) > 1 else None
            if last_keep is not None and self.output.top_n > last_keep:
                raise ValueError(
                    f"output.top_n {self.output.top_n} is more than the {last_keep} candidates per query the "
                    f"stage before the last ({named[-2].name}) keeps; lower output.top_n or raise that keep"
                )
            if named != self.cascade:
                object.__setattr__(self, "cascade", named)  # names filled in, without revalidating
        return self


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
            msg = "unknown key (check its spelling against docs/configuration.md)"
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


# ---------------------------------------------------------------------------------------------- online service


class ServeConfig(_Strict):
    """`rerank serve`: the online reranking service on Ray Serve."""

    host: str = Field(
        "127.0.0.1",
        description="Address the HTTP proxy binds. Anything but loopback needs an API key (or allow_unauthenticated).",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Ray Serve proxy.")
    app_name: str = Field("rerank", min_length=1, description="Ray Serve application name.")
    route_prefix: str = Field("/", description="URL prefix of every endpoint, e.g. /rerank-svc behind a shared proxy.")
    model_name: str | None = Field(
        None,
        description="Model id reported by /v1/models and in responses (default: the last part of model.name_or_path). "
        "The 'model' field of requests is accepted whatever it says.",
    )
    api_key: str | None = Field(
        None,
        description="Deprecated: set the environment variable named by api_key_env instead. Accepted only by a "
        "local `rerank serve` (which puts it in that variable before it starts Ray); a cluster or a Serve config "
        "file refuses it, because it would be stored in Ray's metadata.",
    )
    api_key_env: str = Field(
        "RERANK_API_KEY",
        description="Environment variable each replica reads the API key (Bearer token clients must send) from; "
        "on a cluster set it from the secret store (e.g. a Kubernetes Secret). Unset or empty: no key.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Allow a non-loopback host without an API key (e.g. behind an authenticating gateway)."
    )
    default_model: str | None = Field(
        None,
        description="With rerankers: the entry a request without a model field goes to (TEI requests have none). "
        "Unset: such a request is refused (400, naming the entries) when there are several.",
    )
    ingress_num_replicas: int = Field(
        1, ge=1, description="With rerankers: replicas of the ingress deployment that routes requests to the models."
    )
    ingress_num_cpus_per_replica: float = Field(
        0.25, ge=0, description="With rerankers: CPUs reserved per ingress replica (it parses, checks and routes)."
    )
    num_replicas: int = Field(1, ge=1, description="Fixed number of replicas; leave unset when autoscaling is set.")
    autoscaling: ServeAutoscalingConfig | None = Field(
        None, description="Set to autoscale between min_replicas and max_replicas instead of a fixed num_replicas."
    )
    num_cpus_per_replica: float = Field(
        1.0,
        gt=0,
        description="CPUs reserved per replica; also its torch thread count on CPU (model.num_threads overrides).",
    )
    num_gpus_per_replica: float | Literal["auto"] = Field(
        "auto", description="GPUs per replica; auto: 1 when the cluster has GPUs and model.device is not cpu, else 0."
    )
    replica_resources: dict[str, PositiveFloat] = Field(
        {},
        description="Custom Ray resources each replica needs, e.g. {scorer: 1}: replicas then run only on nodes "
        "that offer it.",
    )
    max_batch_pairs: int = Field(
        256,
        ge=1,
        description="(query, document) pairs scored in one model call, gathered when the model is free from all "
        "waiting requests; the Scorer runs a call in length-sorted forward passes of model.max_batch_tokens padded "
        "tokens. Larger: better throughput, longer waits.",
    )
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0,
        description="How long a model call short of max_batch_pairs waits for more requests: latency vs call size.",
    )
    max_documents: int = Field(
        10_000,
        ge=1,
        description="Documents per request; larger requests are refused with 413. Large requests are "
        "split across batches, so this bounds work per request, not batch size.",
    )
    max_text_chars: int = Field(
        32_768,
        ge=1,
        description="Characters per query or document; longer texts are refused with 413 (the model "
        "truncates to model.max_length tokens anyway, this caps tokenizer work).",
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Requests a replica works on at once (all of them can share batches). Past this, requests wait "
        "in the proxy's queue.",
    )
    max_queued_requests: int = Field(
        256,
        ge=-1,
        description="Requests waiting in each proxy for a free replica; past it: 503 + Retry-After. -1: unbounded.",
    )
    max_queued_pairs: int = Field(
        20_000,
        ge=1,
        description="Pairs admitted into a replica and not yet scored; a request that would pass it gets 503 + "
        "Retry-After (one request is always admitted into an idle replica, whatever its size).",
    )
    retry_after_s: int = Field(2, ge=0, description="Retry-After seconds sent with 503 (overload) responses.")
    request_timeout_s: float = Field(
        120.0,
        gt=0,
        description="End-to-end limit of one HTTP request in Serve's proxy, waiting for a replica included; past "
        "it the proxy answers 408. Raise it for requests of thousands of documents on CPU.",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="Grace period of a stop: on SIGTERM or Ctrl-C `rerank serve` answers new requests 503 + "
        "Retry-After and lets the requests in flight finish for up to this long (those still unanswered then get "
        "503), before it stops Serve. Also each replica's graceful shutdown timeout in Serve (scale-down, redeploy, "
        "app deletion). 0: stop at once.",
    )
    health_check_period_s: float = Field(
        10.0, gt=0, description="How often Serve calls each replica's health check (a one-pair model probe)."
    )
    health_check_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A health check not answered within this is a failure; Serve replaces a replica that fails it.",
    )

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set serve.num_replicas or serve.autoscaling, not both")
        if self.autoscaling is not None and self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError("serve.autoscaling.target_ongoing_requests must be <= serve.max_ongoing_requests")
        if not self.route_prefix.startswith("/"):
            raise ValueError("serve.route_prefix must start with /")
        return self


class ServeAppConfig(_Strict):
    """`rerank serve` and the Ray Serve application builder `pipelines.serve:build_app`."""

    model: ModelConfig | None = Field(None, description="The reranker served (or several, named, as rerankers).")
    rerankers: list[RerankerSpec] | None = Field(
        None,
        min_length=1,
        description="Several named rerankers in one application ({name, model} or {name, cascade}), routed by the "
        "request's model field; instead of model.",
    )
    serve: ServeConfig = Field(default_factory=ServeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _model_or_rerankers(self) -> ServeAppConfig:
        if (self.model is None) == (self.rerankers is None):
            raise ValueError("give the reranker as model, or several as rerankers: [{name, model}, ...], not both")
        if self.rerankers is None:
            if self.serve.default_model is not None:
                raise ValueError("serve.default_model names an entry of rerankers:, and there is none (model: is set)")
            return self
        check_rerankers(self.rerankers)
        if self.serve.model_name is not None:
            raise ValueError(
                "serve.model_name names the one model of model:; with rerankers each entry's name is its id"
            )
        names = [r.name for r in self.rerankers]
        if self.serve.default_model is not None and self.serve.default_model not in names:
            raise ValueError(
                f"serve.default_model {self.serve.default_model!r} is not in rerankers; name one of {names}"
            )
        for spec in self.rerankers:
            for stage in spec.cascade or []:
                if stage.reranker is not None and stage.serve is not None:
                    raise ValueError(
                        f"rerankers: {spec.name}: stage {stage.name} runs on {stage.reranker}'s deployment: set its "
                        f"serve: on the entry {stage.reranker}, not on the stage"
                    )
        self.served_models()  # every deployment's settings valid, names distinct
        return self

    def served_models(self) -> dict[str, tuple[ModelConfig, ServeConfig]]:
        """With rerankers: each model deployment's id (an entry's name, or <cascade>.<stage> for a stage with its
        own model) -> its model and its serve settings (the top-level serve section under its own serve:)."""
        out: dict[str, tuple[ModelConfig, ServeConfig]] = {}
        for spec in self.rerankers or []:
            own = [(spec.name, spec.model, spec.serve)] if spec.model is not None else []
            own += [(f"{spec.name}.{st.name}", st.model, st.serve) for st in spec.cascade or [] if st.model is not None]
            for name, model, settings in own:
                if name in out:
                    raise ValueError(
                        f"rerankers: {name!r} names both an entry and a cascade stage with its own model; rename one"
                    )
                out[name] = (model, deployment_serve(self.serve, settings, name))
        return out


def deployment_serve(top: ServeConfig, own: ServeDeploymentConfig | None, name: str) -> ServeConfig:
    """The serve settings of one model deployment of `rerankers:`: the top-level section, the entry's own keys over
    it (its num_replicas or autoscaling replacing the other), model_name set to its id."""
    data = top.model_dump(exclude_unset=True)
    data.pop("model_name", None)
    data.pop("default_model", None)
    extra = own.model_dump(exclude_unset=True) if own is not None else {}
    if "num_replicas" in extra or "autoscaling" in extra:
        data.pop("num_replicas", None)
        data.pop("autoscaling", None)
    data.update({k: v for k, v in extra.items() if v is not None})
    try:
        return ServeConfig.model_validate({**data, "model_name": name})
    except ValidationError as err:
        raise ValueError(f"rerankers: {name}: serve: {format_validation_error(err)}") from None


# ---------------------------------------------------------------------------- evaluation (`rerank eval`)


class EvalDataConfig(_Strict):
    """Where the test collection comes from. Only queries with at least one relevant judgment are evaluated."""

    format: Literal["cranfield", "beir", "smart", "files"] = Field(
        "cranfield",
        description="cranfield: the Cranfield 1400 collection shipped with the package (no paths needed). "
        "beir: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) in data.path. "
        "smart: SMART files (.I records) named by data.corpus/queries/qrels. "
        "files: corpus and queries as JSONL/Parquet (queries also id<TAB>text TSV), qrels as TREC or BEIR TSV.",
    )
    path: str | None = Field(
        None, description="The BEIR folder (format beir); another Cranfield copy (format cranfield)."
    )
    corpus: str | None = Field(
        None, description="Corpus file: JSONL/Parquet {_id|doc_id, text, title?} or a SMART file."
    )
    queries: str | None = Field(
        None, description="Queries file: JSONL/Parquet {_id|query_id, text|query}, TSV or SMART."
    )
    qrels: str | None = Field(None, description="Judgments: TREC qrels (qid iter docid rel), BEIR TSV or SMART.")
    split: str = Field("test", description="BEIR qrels split: reads qrels/<split>.tsv.")
    title: Literal["prepend", "ignore"] = Field(
        "prepend", description="prepend: a document's title is joined before its text (the chunk the LLM reads)."
    )
    relevance_map: dict[int, int] | None = Field(
        None,
        description="Raw judgment label -> gain, e.g. {1: 4, 2: 3, 3: 2, 4: 1, -1: 0} (Cranfield's; applied by "
        "format cranfield). Default: the label itself, negatives as 0 (judged not relevant).",
    )
    smart_query_ids: Literal["position", "number"] = Field(
        "position",
        description="SMART query ids: position (1-based place in the file; Cranfield's judgments use it) or the .I number.",
    )
    max_queries: int | None = Field(
        None, ge=1, description="Evaluate only the first N judged queries (natural id order): a quick slice."
    )

    @model_validator(mode="after")
    def _paths(self) -> EvalDataConfig:
        if self.format == "beir" and not self.path:
            raise ValueError("data.format beir needs data.path (the folder holding corpus.jsonl)")
        if self.format in ("smart", "files"):
            missing = [k for k in ("corpus", "queries", "qrels") if not getattr(self, k)]
            if missing:
                raise ValueError(f"data.format {self.format} needs " + ", ".join(f"data.{k}" for k in missing))
        return self


class BM25Config(_Strict):
    """BM25 through bm25s (lowercase, words of 2+ characters, no stemming)."""

    k1: float = Field(1.5, gt=0, description="Term-frequency saturation.")
    b: float = Field(0.75, ge=0, le=1, description="Length normalisation.")
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = Field(
        "lucene", description="bm25s scoring variant; lucene is what Elasticsearch/OpenSearch use."
    )
    stopwords: Literal["english", "none"] = Field(
        "english", description="Stop-word list removed from docs and queries."
    )


class FirstStageConfig(_Strict):
    """The candidates the reranker sees: built in (bm25, dense) or given as a TREC run file."""

    kind: Literal["bm25", "dense", "run"] = Field(
        "bm25", description="bm25: bm25s over the corpus. dense: a bi-encoder's cosine top-k. run: a TREC run file."
    )
    depth: int | None = Field(
        None,
        ge=1,
        description="Candidates kept per query (K_max). Default: the largest of k_values and n_grid. A deeper first "
        "stage costs nothing in scoring (only the top K are reranked) but more memory.",
    )
    run: str | None = Field(
        None, description="TREC run file (kind run); ordered by score, ties by doc id descending, like trec_eval."
    )
    bm25: BM25Config = Field(default_factory=BM25Config)
    model: ModelConfig | None = Field(
        None, description="Embedding model for kind dense (model.kind must be bi-encoder); embeds on the driver."
    )

    @model_validator(mode="after")
    def _kind(self) -> FirstStageConfig:
        if self.kind == "run" and not self.run:
            raise ValueError("first_stage.kind run needs first_stage.run (a TREC run file)")
        if self.kind == "dense":
            if self.model is None:
                raise ValueError("first_stage.kind dense needs first_stage.model (a bi-encoder)")
            if self.model.kind != "bi-encoder":
                raise ValueError("first_stage.model.kind must be bi-encoder for a dense first stage")
        return self


class EvalCostConfig(_Strict):
    """How LLM context is counted and priced."""

    tokenizer: str | None = Field(
        None,
        description="Hugging Face tokenizer (hub id or folder) that counts the tokens of the chunks sent to the LLM. "
        "Default: the reranker's (model.name_or_path). Use your LLM's tokenizer for exact counts.",
    )
    price_per_million_tokens: float = Field(
        1.0, ge=0, description="LLM input price per million context tokens, in cost.currency."
    )
    currency: str = Field("USD", description="Label printed beside money figures.")
    reranker_price_per_hour: float = Field(
        1.0,
        ge=0,
        description="Price of an hour of the hardware the rerankers ran on, in cost.currency: each reranker's "
        "cost per 1,000 queries is its pairs at its measured pairs/s at this price.",
    )


class EvalReportConfig(_Strict):
    dir: str = Field("rerank-output/eval", description="Local folder for report.json, report.md, the plot and runs/.")
    mode: Literal["error", "overwrite"] = Field(
        "error", description="error: stop if the folder is not empty. overwrite: delete it first."
    )


class EvalConfig(_Strict):
    """`rerank eval`: what reranking buys, as N_Base, K and N_Reranked on a test collection."""

    data: EvalDataConfig = Field(default_factory=EvalDataConfig)
    first_stage: FirstStageConfig = Field(default_factory=FirstStageConfig)
    model: ModelConfig | None = Field(
        None, description="The reranker, scored through the batch job (or give several in rerankers)."
    )
    rerankers: list[RerankerSpec] | None = Field(
        None,
        min_length=1,
        description="Several named rerankers ({name, model}) scored over the same first-stage candidates and "
        "reported side by side; instead of model.",
    )
    k_values: list[int] = Field(
        [10, 20, 50, 100], min_length=1, description="K: first-stage candidates reranked, one run per value."
    )
    n_grid: list[int] = Field(
        [1, 3, 5, 10, 20, 50, 100], min_length=1, description="N: chunks sent to the LLM, reported for every run."
    )
    n_base: list[int] = Field(
        [10], min_length=1, description="N_Base: chunks the LLM gets from the first stage alone; one answer per value."
    )
    quality_measure: Literal["R", "Success", "nDCG", "P"] = Field(
        "R",
        description="What 'quality at N' means in the N_Base / N_Reranked answer: R (recall@N: share of the relevant "
        "chunks the LLM gets), Success (hit@N: at least one relevant), nDCG or P (precision) at cutoff N.",
    )
    tolerance: float = Field(
        0.0,
        ge=0,
        description="N_Reranked is the smallest N with quality >= first stage's quality at N_Base - tolerance.",
    )
    cost: EvalCostConfig = Field(default_factory=EvalCostConfig)
    report: EvalReportConfig = Field(default_factory=EvalReportConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("k_values", "n_grid", "n_base", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @field_validator("k_values", "n_grid", "n_base")
    @classmethod
    def _positive_sorted(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError("values must be >= 1")
        return sorted(set(v))

    @property
    def depth(self) -> int:
        """K_max: candidates per query from the first stage."""
        return self.first_stage.depth or max(self.k_values + self.n_grid + self.n_base)

    @property
    def reranker_specs(self) -> list[RerankerSpec]:
        """The rerankers evaluated: the list, or the one `model` under the name 'rerank'."""
        if self.rerankers:
            return self.rerankers
        return [RerankerSpec(name="rerank", model=self.model)]  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _one_way_to_name_rerankers(self) -> EvalConfig:
        if (self.model is None) == (self.rerankers is None):
            raise ValueError("give the reranker as model, or several as rerankers: [{name, model}, ...], not both")
        check_rerankers(self.rerankers or [])
        names = [r.name for r in self.rerankers or []]
        if "first_stage" in names:
            raise ValueError("rerankers: 'first_stage' is the name of the first-stage run; pick another")
        return self

    @model_validator(mode="after")
    def _depth(self) -> EvalConfig:
        need = max(self.k_values + self.n_grid + self.n_base)
        if self.first_stage.depth is not None and self.first_stage.depth < need:
            raise ValueError(
                f"first_stage.depth {self.first_stage.depth} is below the largest K / N asked for ({need})"
            )
        return self
