"""The export cache and what goes in it: the ONNX export of a model's features, ONNX Runtime's fusions and
dynamic int8, the OpenVINO IR and NNCF static int8 (calibrated on the bundled Cranfield pairs).

Each artifact is built once per (model fingerprint, kind, settings, converter versions) into the cache folder
(`model.cache_dir`, else $RERANK_CACHE_DIR, else ~/.cache/rerank), under a file lock so that concurrent actors
wait for one export instead of racing, and renamed into place so a crash leaves nothing half made.

Every float32 export is verified before it is used: the ONNX graph against the torch features module it was
exported from, the OpenVINO IR against the same torch outputs, on a small right-padded probe batch (the Scorer pads
right for these backends). The result, max |difference| included, is written to VERIFY.json in the artifact's
folder. An export that fails, or differs by more than EXPORT_TOLERANCE, is recorded there too (without the graph)
and raises ExportRefused with a one-line reason on every later load: load_backend then scores with torch."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.io.collections import load_cranfield
from pipelines.model.backends.selection import vnni
from pipelines.model.backends.torch_backends import (
    HEAD_ONLY_MODEL_TYPES,
    _Features,
    head_only_last_layer,
    load_hf_model,
)

if TYPE_CHECKING:
    from pipelines.config import ModelConfig

log = logging.getLogger(__name__)

ONNX_OPSET = 17
#: Bumped when what an export contains changes (2: the head-only last layer; 3: traced on a padded batch with the
#: tokenizer's pad id in the model config, verified against torch), so older cached files are not reused.
EXPORT_FORMAT = "3"
#: Largest |export - torch| on the probe batch for a float32 export (ONNX, OpenVINO IR) to be used, relative to the
#: probe's scale: max |difference| <= EXPORT_TOLERANCE x (1 + max |torch feature|). A graph off by more than
#: float32 rounding is a wrong graph (a branch traced for one input shape, a pooling index baked in), not noise.
EXPORT_TOLERANCE = 1e-3
#: The probe batch: rows of PROBE_LENGTH, 5 fewer real tokens per row after the first, padded on the right.
PROBE_ROWS, PROBE_LENGTH = 4, 24


class ExportRefused(RuntimeError):
    """A model's export failed or does not score like torch; the message is one line (load_backend logs it and
    scores with torch)."""


#: Exports and quantisations done by this process, by artifact kind: tests assert a second load reuses the cache.
EXPORTS: Counter[str] = Counter()
#: Pairs of (query, passage) used to calibrate OpenVINO's static int8 quantisation (from the bundled Cranfield).
CALIBRATION_PAIRS = 200


def cache_root(config: ModelConfig) -> Path:
    root = config.cache_dir or os.environ.get("RERANK_CACHE_DIR") or "~/.cache/rerank"
    return Path(root).expanduser()


def artifact_dir(config: ModelConfig, fingerprint: str, what: str, **extra: Any) -> Path:
    """<cache>/<model name>-<hash of the model and the exporting libraries>/<what>[-<hash of its settings>]: a new
    model, revision, kind, export setting or converter version never reuses an old file."""
    import transformers

    parts = [fingerprint, config.kind, f"opset{ONNX_OPSET}", EXPORT_FORMAT, torch.__version__, transformers.__version__]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.name_or_path.rstrip("/").rsplit("/", 1)[-1])[:60] or "model"
    if extra:
        settings = "|".join(f"{k}={v}" for k, v in sorted(extra.items()))
        what += "-" + hashlib.sha256(settings.encode()).hexdigest()[:8]
    return cache_root(config) / f"{name}-{key}" / what


def cached(target: Path, build, what: str) -> Path:
    """Return `target`, building it first (once, under a file lock) if it is not there. `build(tmp_dir)` writes
    the artifact's files into a temporary folder that is renamed into place, so a crash leaves nothing half made."""
    from filelock import FileLock

    if target.is_dir() and (target / "_COMPLETE").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=3600):
        if (target / "_COMPLETE").is_file():  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / "_COMPLETE").write_text("")
            if target.exists():
                import shutil

                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        EXPORTS[what] += 1
        log.info("built %s in %s", what, target)
    return target


def _input_names(uses_tt: bool) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_tt else [])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _run_graph(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    """An ONNX file's first output on `feed`: ONNX Runtime, or OpenVINO in float32 where it is not installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return _run_openvino(path, feed)
    return np.asarray(_ort_session(path).run(None, feed)[0], dtype=np.float32)


def _run_openvino(model, feed: dict[str, np.ndarray]) -> np.ndarray:
    """An OpenVINO model's (or an ONNX / IR file's) first output on `feed`, computed in float32."""
    import openvino as ov

    core = ov.Core()
    if isinstance(model, (str, Path)):
        model = core.read_model(str(model))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.array(compiled(feed)[0], dtype=np.float32)


def _verdict(ref: np.ndarray, got: np.ndarray, what: str, pad_id: int) -> dict[str, Any]:
    """Whether `got` (an export's output on the probe) equals `ref` (torch's) within EXPORT_TOLERANCE."""
    scale = 1.0 + float(np.abs(ref).max()) if ref.size else 1.0
    diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
    ok = bool(np.isfinite(got).all()) and diff <= EXPORT_TOLERANCE * scale
    out: dict[str, Any] = {
        "ok": ok,
        "max_abs_diff": diff if np.isfinite(diff) else None,
        "tolerance": EXPORT_TOLERANCE * scale,
        "relative_tolerance": EXPORT_TOLERANCE,
        "probe": f"{ref.shape[0]} rows of up to {ref.shape[1]} tokens, right-padded with id {pad_id}",
    }
    if not ok:
        size = f"{diff:.2g}" if np.isfinite(diff) else f"shape {got.shape} instead of {ref.shape}"
        out["error"] = (
            f"its {what} differs from torch by {size} on a padded probe batch (tolerance {EXPORT_TOLERANCE:g} x "
            f"(1 + max |score|) = {EXPORT_TOLERANCE * scale:.2g})"
        )
    return out


def _record(folder: Path, verdict: dict[str, Any]) -> None:
    """VERIFY.json in an artifact's folder; a refused graph's files (the graph, its external weights, the probe)
    are removed: nothing loads them."""
    import json

    if not verdict["ok"]:
        for f in folder.iterdir():
            if f.is_file() and f.name != "HEAD_ONLY":
                f.unlink()
    (folder / "VERIFY.json").write_text(json.dumps(verdict, indent=1))


def export_verdict(folder: Path) -> dict[str, Any]:
    """An artifact folder's VERIFY.json ({"ok": True} for artifacts that are not verified, e.g. int8)."""
    import json

    f = folder / "VERIFY.json"
    return json.loads(f.read_text()) if f.is_file() else {"ok": True}


def _usable(folder: Path) -> Path:
    verdict = export_verdict(folder)
    if not verdict.get("ok", False):
        raise ExportRefused(verdict.get("error") or "the export was refused")
    return folder


def _set_pad_id(features: torch.nn.Module, kind: str, pad_id: int) -> None:
    """What the Scorer does to the torch model (PairEncoder.adapt_model_config): a cross-encoder's config carries
    the tokenizer's pad id (a decoder classifier finds each row's last real token by it)."""
    cfg = getattr(features.model, "config", None)
    if kind == "cross-encoder" and cfg is not None and getattr(cfg, "pad_token_id", None) != pad_id:
        cfg.pad_token_id = pad_id


def export_onnx(config: ModelConfig, fingerprint: str, uses_tt: bool, pad_id: int = 0) -> Path:
    """float32 ONNX of the features module (int32 inputs, dynamic batch and sequence axes), cached, verified
    against the torch module on a padded probe batch (VERIFY.json). Raises ExportRefused (one line) when the
    export failed or differs by more than EXPORT_TOLERANCE; the refusal is cached too, so later loads do not
    export again. `pad_id`: the id the Scorer pads with (the tokenizer's, after PairEncoder prepared it)."""

    def build(tmp: Path) -> None:
        model = _Features(load_hf_model(config, "eager"), config.kind).eval()
        _set_pad_id(model, config.kind, pad_id)
        names = _input_names(uses_tt)
        hf = model.model.config
        vocab = int(getattr(hf, "vocab_size", 1000) or 1000)
        positions = int(getattr(hf, "max_position_embeddings", 0) or 0)
        length = PROBE_LENGTH if positions <= 0 else max(6, min(PROBE_LENGTH, positions - 4))
        try:
            (tmp / "HEAD_ONLY").write_text(str(head_only_last_layer(model)))
            feed = _probe_feed(uses_tt, vocab, pad_id, rows=PROBE_ROWS, length=length)
            # Traced on a padded batch, so a branch taken only without padding is not what the graph keeps.
            example_feed = _probe_feed(uses_tt, vocab, pad_id, rows=2, length=min(8, length))
            example = tuple(torch.from_numpy(example_feed[n]) for n in names)
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
            axes["features"] = {0: "batch"}
            with torch.inference_mode():
                ref = model(*(torch.from_numpy(feed[n]) for n in names)).float().numpy()
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    example,
                    str(tmp / "model.onnx"),
                    input_names=names,
                    output_names=["features"],
                    dynamic_axes=axes,
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
            verdict = _verdict(ref, _run_graph(tmp / "model.onnx", feed), "ONNX export", pad_id)
            np.savez(tmp / "probe.npz", reference=ref, **feed)  # for the OpenVINO IR's check
        except MemoryError:
            raise
        except OSError as err:
            if err.errno is not None:  # the disk or the file system, not the model: not recorded, raised
                raise
            verdict = {"ok": False, "error": f"the ONNX export failed: {_first_line(err)}"}
        except Exception as err:  # noqa: BLE001 - any exporter or runtime failure: recorded, and torch scores it
            verdict = {"ok": False, "error": f"the ONNX export failed: {_first_line(err)}"}
        _record(tmp, verdict)

    target = artifact_dir(config, fingerprint, "onnx-float32", tt=uses_tt, pad=pad_id)
    return _usable(cached(target, build, "onnx-float32")) / "model.onnx"


#: Largest |difference| to the unfused export allowed for ONNX Runtime's transformer fusions (else unfused is kept).
FUSION_TOLERANCE = 1e-4


def _probe_feed(
    uses_tt: bool, vocab: int, pad_id: int = 0, rows: int = PROBE_ROWS, length: int = PROBE_LENGTH
) -> dict[str, np.ndarray]:
    """A small right-padded batch of random token ids (rows of different lengths; padding holds `pad_id`, real
    tokens never do) to compare two graphs on."""
    rng = np.random.default_rng(0)
    lo, hi = min(5, vocab - 1), max(min(5, vocab - 1) + 1, min(vocab, 2000))
    ids = rng.integers(lo, hi, (rows, length)).astype(np.int32)
    ids[ids == pad_id] = lo if lo != pad_id else lo + 1
    mask = np.ones((rows, length), dtype=np.int32)
    step = max(1, min(5, (length - 1) // max(1, rows - 1)))
    for r in range(1, rows):
        mask[r, length - step * r :] = 0
    ids[mask == 0] = pad_id
    feed = {"input_ids": ids, "attention_mask": mask}
    if uses_tt:
        tt = np.zeros_like(ids)
        tt[:, length // 2 :] = 1
        feed["token_type_ids"] = tt * mask
    return feed


def _ort_session(path: Path | str, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def fuse_onnx(config: ModelConfig, fingerprint: str, uses_tt: bool, hf_config, pad_id: int = 0) -> Path:
    """The float32 export with ONNX Runtime's transformer fusions for BERT-family encoders (EmbedLayerNormalization,
    Attention, SkipLayerNormalization, BiasGelu; `onnxruntime.transformers.optimizer`, opt_level 0 so the file
    stays portable), cached. The fused graph is compared with the unfused one on a padded probe batch; a
    difference above FUSION_TOLERANCE, or an architecture the optimizer does not know, keeps the unfused file
    (FUSED says which)."""
    src = export_onnx(config, fingerprint, uses_tt, pad_id)
    model_type = getattr(hf_config, "model_type", "")
    heads = getattr(hf_config, "num_attention_heads", 0)
    hidden = getattr(hf_config, "hidden_size", 0)

    def build(tmp: Path) -> None:
        import shutil

        fused = False
        if model_type in HEAD_ONLY_MODEL_TYPES and heads and hidden:
            try:
                from onnxruntime.transformers.optimizer import optimize_model

                logging.disable(logging.INFO)  # the optimizer logs every fusion at INFO on its own loggers
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        opt = optimize_model(
                            str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0
                        )
                        opt.save_model_to_file(str(tmp / "model.onnx"))
                finally:
                    logging.disable(logging.NOTSET)
                feed = _probe_feed(uses_tt, int(getattr(hf_config, "vocab_size", 1000)), pad_id)
                ref = _ort_session(src).run(None, feed)[0]
                got = _ort_session(tmp / "model.onnx").run(None, feed)[0]
                diff = float(np.abs(got - ref).max())
                fused = got.shape == ref.shape and diff <= FUSION_TOLERANCE
                if not fused:
                    log.info("ONNX Runtime fusions differ by %.2g from the export; keeping it unfused", diff)
            except Exception as err:  # noqa: BLE001 - any optimizer failure: keep the plain export
                log.info("ONNX Runtime fusions not usable for %s: %s", model_type, err)
        if not fused:
            shutil.copyfile(src, tmp / "model.onnx")
        (tmp / "FUSED").write_text(str(fused))
        (tmp / "HEAD_ONLY").write_text(str(export_is_head_only(src)))

    import onnxruntime

    target = artifact_dir(
        config, fingerprint, "onnx-float32-fused", tt=uses_tt, pad=pad_id, ort=onnxruntime.__version__
    )
    return cached(target, build, "onnx-float32-fused") / "model.onnx"


def export_is_fused(onnx_path: Path) -> bool:
    marker = onnx_path.parent / "FUSED"
    return marker.is_file() and marker.read_text().strip() == "True"


def export_is_head_only(onnx_path: Path) -> bool:
    """Whether an ONNX export (and so what is quantised or converted from it) has the head-only last layer."""
    marker = onnx_path.parent / "HEAD_ONLY"
    return marker.is_file() and marker.read_text().strip() == "True"


#: MatMul nodes of the first encoder layer (torch.onnx names them /<model>/encoder/layer.0/...): kept in float32.
_FIRST_LAYER = re.compile(r"/encoder/layers?\.0/")


def onnx_int8_settings() -> dict[str, Any]:
    """ONNX Runtime dynamic int8 settings for this CPU (part of the export's cache key).

    ONNX Runtime's default format, U8S8 (uint8 activations, int8 weights), multiplies on AVX2/AVX512 without VNNI
    with vpmaddubsw, whose 16-bit sum of two uint8 x int8 products saturates: that is what lost 1.5% nDCG@10 at
    K=100 on the AVX2 EPYC, while the same model kept it (-0.1%) on a VNNI EPYC, where vpdpbusd sums in 32 bits.
    Without VNNI the weights are therefore uint8 too (U8U8, widened to 16 bits before multiplying: no saturation):
    -0.9% at K=100 measured (its integer arithmetic does not depend on the CPU). 7-bit weights (reduce_range)
    also avoid saturation but lost 2.1%."""
    if vnni():
        return {"reduce_range": False, "per_channel": True, "float32_layers": "first"}
    return {"reduce_range": False, "per_channel": True, "float32_layers": "first", "weights": "uint8"}


def quantize_onnx_int8(config: ModelConfig, fingerprint: str, uses_tt: bool, pad_id: int = 0) -> Path:
    """ONNX Runtime dynamic quantisation: 8-bit weights with one scale per output channel (int8 with VNNI, uint8
    without: onnx_int8_settings), uint8 activations quantised per call, and the first encoder layer left in
    float32.

    Measured on the MiniLM weights (Cranfield, BM25 top 100, nDCG@10 against float32 torch, one run): per-tensor
    weights -3.5%, per-channel -1.7%, per-channel with the first layer in float32 -0.04% (the embeddings' sum and
    its layer norm are what 8-bit activations hurt most; the other five layers in int8 lost 1.4% when the last
    one was kept instead). The activation scale is per call, so a pair's score moves slightly with the other
    pairs of its micro-batch (docs/backends.md: the spread)."""
    src = export_onnx(config, fingerprint, uses_tt, pad_id)
    settings = onnx_int8_settings()

    def build(tmp: Path) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        graph = onnx.load(str(src), load_external_data=False).graph
        keep = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and _FIRST_LAYER.search(n.name)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src),
                str(tmp / "model.onnx"),
                weight_type=QuantType.QUInt8 if settings.get("weights") == "uint8" else QuantType.QInt8,
                reduce_range=settings["reduce_range"],
                per_channel=settings["per_channel"],
                nodes_to_exclude=keep,
            )

    target = artifact_dir(config, fingerprint, "onnx-int8", tt=uses_tt, pad=pad_id, **settings)
    return cached(target, build, "onnx-int8") / "model.onnx"


def _calibration_inputs(tokenizer, config: ModelConfig, uses_tt: bool, max_length: int) -> list[dict[str, np.ndarray]]:
    """Model inputs for int8 calibration: (query, abstract) pairs of the Cranfield collection bundled with the
    package (half judged relevant, half not), or the texts alone for a bi-encoder. Activation ranges only; no
    labels are used."""
    col = load_cranfield()
    qids = sorted(col.qrels, key=lambda q: int(q) if q.isdigit() else 0)
    docs = sorted(col.corpus)
    pairs = []
    for i, q in enumerate(qids):
        if len(pairs) >= CALIBRATION_PAIRS or q not in col.queries:
            continue
        rel = [d for d, g in col.qrels[q].items() if g > 0 and d in col.corpus]
        d = rel[0] if (i % 2 == 0 and rel) else docs[(i * 37) % len(docs)]
        pairs.append((col.queries[q], col.corpus[d]))
    names = _input_names(uses_tt)
    out = []
    for q, p in pairs:
        if config.kind == "cross-encoder":
            enc = tokenizer(q, p, truncation="longest_first", max_length=max_length)
        else:
            enc = tokenizer(p, truncation=True, max_length=max_length)
        item = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if uses_tt:
            item["token_type_ids"] = enc.get("token_type_ids") or [0] * len(enc["input_ids"])
        out.append({n: np.asarray([item[n]], dtype=np.int32) for n in names})
    return out


#: OpenVINO int8 on a CPU with native bfloat16: the operations left out of int8 run in bfloat16 instead of float32.
OPENVINO_INT8_BF16 = True


def openvino_int8_settings() -> dict[str, Any]:
    """NNCF static quantisation settings (part of the export's cache key): the first encoder layer's matmuls stay
    in float32 and SmoothQuant is off. Measured on the MiniLM weights (Cranfield, BM25 top 100, nDCG@10 against
    float32 at K = 10 / 20 / 100, a VNNI EPYC): NNCF's defaults -0.1% / -0.7% / -1.4%; first layer in float32
    +0.2% / -0.2% / -0.4%; that and no SmoothQuant +1.1% / +0.6% / +0.1%; the MIXED preset as the defaults."""
    return {"float32_layers": "first", "preset": "performance", "smooth_quant": False}


def export_openvino(
    config: ModelConfig, fingerprint: str, uses_tt: bool, dtype: str, tokenizer, max_length: int, pad_id: int = 0
):
    """OpenVINO IR converted from the ONNX export (weights kept float32), verified in float32 against the torch
    outputs the ONNX export was checked with (ExportRefused, cached, when it differs or fails); for int8, NNCF
    static quantisation calibrated on the bundled Cranfield pairs. Cached."""
    src = export_onnx(config, fingerprint, uses_tt, pad_id)

    def build_ir(tmp: Path) -> None:
        import openvino as ov

        try:
            model = ov.convert_model(str(src))
            probe = src.parent / "probe.npz"
            if probe.is_file():
                with np.load(probe) as saved:
                    feed = {k: saved[k] for k in saved.files if k != "reference"}
                    ref = saved["reference"]
                verdict = _verdict(ref, _run_openvino(model, feed), "OpenVINO conversion", pad_id)
            else:
                verdict = {"ok": True, "note": "no probe saved with the ONNX export"}
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        except MemoryError:
            raise
        except Exception as err:
            if isinstance(err, OSError) and err.errno is not None:
                raise
            verdict = {"ok": False, "error": f"the OpenVINO conversion failed: {_first_line(err)}"}
        _record(tmp, verdict)

    import openvino as ov

    ver = ov.get_version()
    fp32 = _usable(
        cached(
            artifact_dir(config, fingerprint, "openvino-float32", tt=uses_tt, pad=pad_id, ov=ver),
            build_ir,
            "openvino-float32",
        )
    )
    if dtype != "int8":
        return fp32 / "model.xml"

    settings = openvino_int8_settings()

    def build_int8(tmp: Path) -> None:
        import nncf

        core = ov.Core()
        model = core.read_model(str(fp32 / "model.xml"))
        data = _calibration_inputs(tokenizer, config, uses_tt, max_length)
        kwargs: dict[str, Any] = {}
        if settings["float32_layers"] == "first":
            names = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"]
            first = [n for n in names if _FIRST_LAYER.search(n)]
            if first:
                kwargs["ignored_scope"] = nncf.IgnoredScope(names=first)
        if settings["preset"] == "mixed":
            kwargs["preset"] = nncf.QuantizationPreset.MIXED
        if settings["smooth_quant"] is False:
            from nncf.quantization.advanced_parameters import (
                AdvancedQuantizationParameters,
                AdvancedSmoothQuantParameters,
            )

            off = AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
            kwargs["advanced_parameters"] = AdvancedQuantizationParameters(smooth_quant_alphas=off)
        quantized = nncf.quantize(
            model, nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(data), **kwargs
        )
        ov.save_model(quantized, str(tmp / "model.xml"), compress_to_fp16=False)

    import nncf

    target = artifact_dir(
        config,
        fingerprint,
        "openvino-int8",
        tt=uses_tt,
        pad=pad_id,
        ov=ver,
        nncf=nncf.__version__,
        n=CALIBRATION_PAIRS,
        max_length=max_length,
        **settings,
    )
    return cached(target, build_int8, "openvino-int8") / "model.xml"
