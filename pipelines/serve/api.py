"""The wire formats of the rerank APIs the service speaks, and their score conventions. No Ray here.

Each API keeps its own request shape, defaults and score normalisation, so its existing clients work unchanged:

- Cohere / Jina (``POST /v1/rerank``, ``POST /v2/rerank``): ``relevance_score`` in [0, 1].
- Hugging Face text-embeddings-inference (``POST /rerank``): ``score`` in [0, 1] unless ``raw_scores``.
- NVIDIA NeMo Retriever reranking NIM (``POST /v1/ranking``): ``logit``, the raw score.

The raw score is ``Scorer.score`` with ``activation: none``, the batch job's number for the same pair. The [0, 1]
scores are what ``activation: sigmoid`` gives the batch job for a cross-encoder (the sigmoid of the logit; for a
two-label model the softmax probability of the positive class) and (cosine + 1) / 2 for a bi-encoder. Results
are ranked by the raw score, best first; ties keep input order.

Non-finite scores: a request any of whose pairs the model scores NaN or infinite (raw or [0, 1] score) is answered
500 with ``error_type: score_not_finite`` and a message naming the model and how many pairs, the same in every
API; no scores are returned for it (JSON has no NaN, and these APIs promise a number for every document). The
batch job rejects the same pairs with reason ``score_not_finite``.

Unknown request fields are ignored (clients send API-specific extras such as ``rank_fields``); known fields are
validated and a bad one is answered 4xx with a message that names it, a text UTF-8 cannot encode (a lone
surrogate) included. Integer fields take JSON integers only (``StrictInt``): ``true``, ``"3"`` or ``3.0`` is a
422, not 1 or 3. Every error has the body of ``ApiError.body``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt


class ApiError(Exception):
    """A request the service refuses: status, a message naming the field, and optional headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        error_type: str = "validation",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = f"{field}: {message}" if field else message
        self.field = field
        self.error_type = error_type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """Readable by each API's clients: Cohere reads ``message``, TEI ``error``/``error_type``."""
        out: dict[str, Any] = {"message": self.message, "error": self.message, "error_type": self.error_type}
        if self.field:
            out["field"] = self.field
        return out


# ------------------------------------------------------------------------------------------------ requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _document_text(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    raise ValueError("must be a string or an object with a string field 'text'")


DocumentText = Annotated[str, BeforeValidator(_document_text)]


class CohereRerankRequest(_Request):
    """Cohere v1/v2 and Jina rerank request."""

    model: str | None = Field(
        None, description="The reranker (rerankers: its name); with one model: accepted whatever it says."
    )
    query: str
    documents: list[DocumentText] = Field(..., description="Strings, or objects with a 'text' field.")
    # StrictInt: a JSON integer only. Pydantic's default would take true as 1, "3" as 3 and 3.0 as 3.
    top_n: StrictInt | None = Field(None, ge=1, description="Results returned (default: all).")
    return_documents: bool = Field(False, description="Echo each document's text in its result.")
    max_tokens_per_doc: StrictInt | None = Field(
        None, ge=1, description="Accepted; documents are cut at model.max_length."
    )


class TEIRerankRequest(_Request):
    """Hugging Face text-embeddings-inference ``/rerank`` request."""

    model: str | None = Field(
        None,
        description="Not in TEI's API: the reranker to use where several are served (rerankers:); default "
        "serve.default_model, or the only one. Ignored with one model:.",
    )
    query: str
    texts: list[str]
    raw_scores: bool = Field(False, description="Raw logits instead of the sigmoid.")
    return_text: bool = Field(False, description="Echo each text in its result.")
    truncate: bool | None = Field(
        False, description="Cut pairs longer than the model's max length; false/null: refuse them with 413."
    )
    truncation_direction: Literal["Right", "right"] = Field("Right", description="Only Right (cut the end).")


class NIMText(_Request):
    text: str


class NIMRankingRequest(_Request):
    """NVIDIA NeMo Retriever reranking NIM ``/v1/ranking`` request."""

    model: str | None = Field(
        None, description="The reranker (rerankers: its name); with one model: accepted whatever it says."
    )
    query: NIMText
    passages: list[NIMText]
    truncate: Literal["NONE", "END"] = Field("NONE", description="END: cut long passages; NONE: refuse them with 413.")


# ------------------------------------------------------------------------------------------------ errors


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "function-before[_document_text(), str]"):
            continue
        else:
            out += f".{p}" if out else str(p)
    return out


_TYPE_MESSAGES = {
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
}


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI/pydantic validation errors -> one ApiError naming the first bad field (400 for bad JSON)."""
    if not errors:
        return ApiError(422, "invalid request")
    err = errors[0]
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "json_invalid":
        detail = f": {ctx['error']}" if ctx.get("error") else ""
        return ApiError(400, f"malformed JSON in the request body{detail}", error_type="malformed_json")
    field = _field_path(tuple(err.get("loc", ())))
    if not field:
        return ApiError(
            400,
            "the request body must be a JSON object, sent with Content-Type: application/json",
            error_type="malformed_json",
        )
    if kind == "missing":
        return ApiError(422, "is required", field=field)
    if kind == "greater_than_equal":
        return ApiError(422, f"must be >= {ctx.get('ge')}", field=field)
    msg = _TYPE_MESSAGES.get(kind) or str(err.get("msg", "is invalid"))
    return ApiError(422, msg.removeprefix("Value error, ").replace("Input should be", "must be"), field=field)


def utf8_problem(text: str) -> str | None:
    """Why text cannot be encoded as UTF-8 (a lone surrogate, e.g. from a JSON escape ``"\\ud800"`` without its
    pair), or None. The tokenizer, the model and the response all need UTF-8, so such a text is refused up front."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"character {err.start} is a lone surrogate (U+{ord(text[err.start]):04X}), which UTF-8 cannot encode: "
            "send text as UTF-8, and pair each \\uD800-\\uDBFF escape with a \\uDC00-\\uDFFF one"
        )
    return None


def http_error(status: int, detail: Any, cause: BaseException | None) -> ApiError:
    """Starlette/FastAPI's own HTTP errors (a body FastAPI could not parse, an unknown path or method) -> the
    documented body. FastAPI answers every body it cannot parse 400 "There was an error parsing the body" and
    chains the real cause, which names the problem here."""
    if isinstance(cause, UnicodeDecodeError):
        return ApiError(
            400,
            f"the request body is not valid UTF-8 (byte {cause.start}: {cause.reason}); send JSON encoded as UTF-8",
            error_type="malformed_json",
        )
    if isinstance(cause, RecursionError):
        return ApiError(
            400,
            "the request body's JSON is nested too deeply to parse; send a flatter request",
            error_type="malformed_json",
        )
    if status == 400:
        return ApiError(400, f"the request body could not be parsed as JSON: {detail}", error_type="malformed_json")
    kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    message = {404: "no such endpoint: see /docs", 405: "method not allowed on this endpoint: see /docs"}
    return ApiError(status, message.get(status, str(detail)), error_type=kinds.get(status, "http_error"))


def check_texts(
    query: str,
    texts: list[str],
    *,
    query_field: str,
    texts_field: str,
    item_suffix: str = "",
    max_documents: int,
    max_text_chars: int,
) -> None:
    """The request-independent rules: text UTF-8 can encode, non-empty query and documents, and the size
    limits. Run before a request joins a batch, so a bad one never reaches the model with other requests."""
    if problem := utf8_problem(query):
        raise ApiError(422, problem, field=query_field)
    if not query.strip():
        raise ApiError(422, "must not be empty", field=query_field)
    if len(query) > max_text_chars:
        raise ApiError(
            413,
            f"{len(query)} characters, more than the limit of {max_text_chars} (serve.max_text_chars)",
            field=query_field,
            error_type="payload_too_large",
        )
    if not texts:
        raise ApiError(422, "must not be empty", field=texts_field)
    if len(texts) > max_documents:
        raise ApiError(
            413,
            f"{len(texts)} documents, more than the limit of {max_documents} per request (serve.max_documents)",
            field=texts_field,
            error_type="payload_too_large",
        )
    for i, text in enumerate(texts):
        if problem := utf8_problem(text):
            raise ApiError(422, problem, field=f"{texts_field}[{i}]{item_suffix}")
        if not text.strip():
            raise ApiError(422, "must not be empty", field=f"{texts_field}[{i}]{item_suffix}")
        if len(text) > max_text_chars:
            raise ApiError(
                413,
                f"{len(text)} characters, more than the limit of {max_text_chars} (serve.max_text_chars)",
                field=f"{texts_field}[{i}]{item_suffix}",
                error_type="payload_too_large",
            )


# ------------------------------------------------------------------------------------------------ responses


def cosine_to_unit(raw: np.ndarray) -> np.ndarray:
    """A bi-encoder's cosine in [-1, 1] -> [0, 1]."""
    return np.clip((np.asarray(raw, dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0)


def non_finite_problem(model: str, raw: np.ndarray, unit: np.ndarray, indices: list[int] | None = None) -> str | None:
    """None when every pair's raw and [0, 1] score is finite; else the one-line message of the 500 the request gets
    (``error_type: score_not_finite``): the model, how many pairs and which kinds, the first pair's index (in the
    request: ``indices`` maps a cascade stage's subset back to it)."""
    raw = np.asarray(raw, dtype=np.float64)
    unit = np.asarray(unit, dtype=np.float64)
    bad = ~(np.isfinite(raw) & np.isfinite(unit))
    if not bad.any():
        return None
    nan = int((np.isnan(raw) | np.isnan(unit))[bad].sum())
    kinds = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (int(bad.sum()) - nan, "infinite")) if n)
    first = int(np.flatnonzero(bad)[0])
    return (
        f"model {model} returned a non-finite score for {int(bad.sum())} of {len(raw)} pairs of this request "
        f"({kinds}; first at document index {first if indices is None else int(indices[first])}); no scores are returned rather than null "
        "ones (the batch job rejects such pairs as score_not_finite)"
    )


def best_first(raw: np.ndarray, top_n: int | None = None) -> np.ndarray:
    order = np.argsort(-np.asarray(raw), kind="stable")
    return order[:top_n] if top_n is not None else order


def cohere_response(
    raw: np.ndarray,
    unit: np.ndarray,
    texts: list[str],
    *,
    top_n: int | None,
    return_documents: bool,
    api_version: str,
) -> dict[str, Any]:
    """raw orders the results; unit (the [0, 1] score) is reported."""
    scores = unit
    results = []
    for i in best_first(raw, top_n):
        item: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i])}
        if return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "meta": {"api_version": {"version": api_version}, "billed_units": {"search_units": 1}},
    }


def tei_response(
    raw: np.ndarray, unit: np.ndarray, texts: list[str], *, raw_scores: bool, return_text: bool
) -> list[dict[str, Any]]:
    scores = raw if raw_scores else unit
    out = []
    for i in best_first(raw):
        item: dict[str, Any] = {"index": int(i), "score": float(scores[i])}
        if return_text:
            item["text"] = texts[i]
        out.append(item)
    return out


def nim_response(raw: np.ndarray) -> dict[str, Any]:
    return {"rankings": [{"index": int(i), "logit": float(raw[i])} for i in best_first(raw)]}
