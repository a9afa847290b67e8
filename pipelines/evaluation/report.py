"""The report folder: report.json (every figure), report.md (the tables, also printed), a plot of quality
against LLM context tokens, runs/<name>.run (the TREC run of every ranking evaluated) and qrels.txt (the
judgments as graded and evaluated), so every figure can be recomputed from the files alone."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import EvalConfig
from pipelines.evaluation.cascade import CascadeFigures, default_tokenizer, describe, model_key
from pipelines.evaluation.costs import token_summary
from pipelines.evaluation.metrics import Ranking, rank_scores
from pipelines.io.collections import Collection, Qrels

log = logging.getLogger(__name__)

FIRST_STAGE = "first_stage"
PLOT = "quality_vs_tokens.png"


def run_name(k: int, reranker: str = "rerank") -> str:
    return f"{reranker}_k{k}"


def job_dir_name(config: EvalConfig, reranker: str) -> str:
    """The batch job's output folder in the report: rerank_job for one model, rerank_job_<name> for several."""
    return "rerank_job" if config.rerankers is None else f"rerank_job_{reranker}"


def _per_1000(config: EvalConfig, n: int, compute_s: float | None, n_queries: int) -> dict[str, Any]:
    seconds = 1000 * compute_s / n_queries if compute_s is not None and n_queries else None
    return {
        "pairs_scored": n,
        "compute_s": compute_s,
        "seconds_per_1000_queries": seconds,
        "cost_per_1000_queries": None if seconds is None else seconds / 3600 * config.cost.reranker_price_per_hour,
    }


def reranker_figures(config: EvalConfig, summary: Any, pairs: dict[int, int], n_queries: int) -> dict[str, Any]:
    """A reranker's measured throughput and what reranking K candidates per query costs per 1,000 queries at it."""
    pps = summary.pairs_per_s
    per_k = {str(k): _per_1000(config, n, n / pps if pps else None, n_queries) for k, n in pairs.items()}
    return {
        "model": summary.model,
        "pairs_scored": summary.pairs_scored,
        "rejected": summary.rejected,
        "wall_time_s": summary.wall_time_s,
        "pairs_per_s": pps,
        "windows_scored": getattr(summary, "windows_scored", None),
        "at_k": per_k,
    }


def cascade_figures(config: EvalConfig, cascade: CascadeFigures, n_queries: int) -> dict[str, Any]:
    """A cascade's stages (the entry whose model each runs, each model's measured throughput, the job folders its
    scores came from) and, per K, the pairs each stage scored, their compute and the total per 1,000 queries."""
    entries = {model_key(s.model): s.name for s in config.reranker_specs if s.model is not None}
    stages = [
        {
            "stage": st.name,
            "reranker": st.reranker or entries.get(model_key(st.model)),
            "name_or_path": st.model.name_or_path,
            "keep": st.keep,
            "pairs_per_s": m.pairs_per_s,
            "seconds_per_pair": m.seconds_per_pair,
            "job_output": m.jobs[0] if len(m.jobs) == 1 else m.jobs,
        }
        for st, m in zip(cascade.stages, cascade.models)
    ]
    per_k = {}
    total = cascade.seconds()
    for k, per_stage in cascade.pairs_per_stage.items():
        fig = _per_1000(config, sum(per_stage), total[k], n_queries)
        fig["stages"] = [
            {"stage": st.name, "pairs_scored": n, "compute_s": sec}
            for st, n, sec in zip(cascade.stages, per_stage, cascade.stage_seconds(k))
        ]
        per_k[str(k)] = fig
    return {"kind": "cascade", "stages": stages, "at_k": per_k}


def build_report(
    *,
    config: EvalConfig,
    coll: Collection,
    qids: list[str],
    fs_info: dict[str, Any],
    summaries: dict[str, Any],
    measures: dict[str, dict[str, float]],
    tokens: dict[str, np.ndarray],
    pairs: dict[str, dict[int, int]],
    rows: list[dict[str, Any]],
    timing: dict[str, float],
    seconds: dict[str, dict[int, float | None]] | None = None,
    cascades: dict[str, CascadeFigures] | None = None,
) -> dict[str, Any]:
    cascades = cascades or {}

    price = config.cost.price_per_million_tokens
    token_ns = sorted(set(config.n_grid + config.n_base + [r["n_reranked"] for r in rows if r["n_reranked"]]))
    owner = {run_name(k, s.name): (s.name, k) for s in config.reranker_specs for k in config.k_values}
    runs: dict[str, Any] = {}
    for name, m in measures.items():
        reranker, k = owner.get(name, (None, None))
        if k is None:
            compute = None
        elif seconds is not None:
            compute = seconds[reranker][k]
        else:
            pps = summaries[reranker].pairs_per_s
            compute = pairs[reranker][k] / pps if pps else None
        runs[name] = {
            "reranker": reranker,
            "k": k,
            "file": f"runs/{name}.run",
            "measures": m,
            "llm_context": {str(n): token_summary(tokens[name], n, price) for n in token_ns},
            "reranker_pairs_scored": 0 if k is None else pairs[reranker][k],
            "reranker_seconds_estimated": compute,
        }
        if reranker in cascades:
            runs[name]["stages"] = cascade_figures(config, cascades[reranker], len(qids))["at_k"][str(k)]["stages"]
    rerankers = {}
    specs = config.reranker_specs
    for spec in specs:
        if spec.model is None:
            rerankers[spec.name] = cascade_figures(config, cascades[spec.name], len(qids))
            rerankers[spec.name]["name_or_path"] = describe(spec, specs)
            continue
        rerankers[spec.name] = reranker_figures(config, summaries[spec.name], pairs[spec.name], len(qids))
        rerankers[spec.name]["job_output"] = job_dir_name(config, spec.name)
        rerankers[spec.name]["name_or_path"] = spec.model.name_or_path
        rerankers[spec.name]["kind"] = spec.model.kind
    first = config.reranker_specs[0].name
    return {
        "collection": {
            "name": coll.name,
            "documents": len(coll.corpus),
            "queries_evaluated": len(qids),
            "relevant_judgments": sum(1 for q in qids for g in coll.qrels.get(q, {}).values() if g > 0),
        },
        "settings": {
            "first_stage": fs_info,
            "reranker": ", ".join(describe(s, specs) for s in specs),
            "rerankers": {s.name: describe(s, specs) for s in specs},
            "k_values": config.k_values,
            "n_grid": config.n_grid,
            "n_base": config.n_base,
            "quality_measure": config.quality_measure,
            "tolerance": config.tolerance,
            "tokenizer": default_tokenizer(config),
            "price_per_million_tokens": price,
            "reranker_price_per_hour": config.cost.reranker_price_per_hour,
            "currency": config.cost.currency,
            "measures_library": "ir_measures (pytrec_eval); mean over evaluated queries, a query with no result = 0",
        },
        # The first (or only) reranker, as one model's report always had it.
        "reranker": rerankers[first],
        "rerankers": rerankers,
        "runs": runs,
        "tradeoff": rows,
        "timing_s": timing,
        "files": {
            "report": "report.md",
            "plot": PLOT,
            "qrels": "qrels.txt",
            "runs": {n: r["file"] for n, r in runs.items()},
        },
        "config": config.model_dump(mode="json"),
    }


# ---------------------------------------------------------------------------------------------------- files


def write_run(path: Path, ranking: Ranking, qids: list[str], tag: str) -> None:
    """TREC run with rank i and score n-i+1: strictly decreasing, so any tool reads this exact order."""
    with path.open("w") as f:
        for q in qids:
            for rank, (d, s) in enumerate(rank_scores(ranking.get(q, [])).items(), 1):
                f.write(f"{q} Q0 {d} {rank} {int(s)} {tag}\n")


def write_qrels(path: Path, qrels: Qrels, qids: list[str]) -> None:
    with path.open("w") as f:
        for q in qids:
            for d, g in sorted(qrels.get(q, {}).items()):
                f.write(f"{q} 0 {d} {g}\n")


def write_report(
    report_dir: Path,
    report: dict[str, Any],
    rankings: dict[str, Ranking],
    qrels: Qrels,
    qids: list[str],
    tokens: dict[str, np.ndarray],
    config: EvalConfig,
) -> str:
    runs_dir = report_dir / "runs"
    runs_dir.mkdir(exist_ok=True)
    for name, ranking in rankings.items():
        write_run(runs_dir / f"{name}.run", ranking, qids, name)
    write_qrels(report_dir / "qrels.txt", qrels, qids)
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (report_dir / "report.md").write_text(markdown)
    plot(report_dir / PLOT, report, tokens, config)
    return markdown


# ---------------------------------------------------------------------------------------------------- tables


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _money(x: float, currency: str) -> str:
    return f"{x:,.4f} {currency}" if x < 1 else f"{x:,.2f} {currency}"


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    c = report["collection"]
    r = report["reranker"]
    grid, qm, cur = s["n_grid"], s["quality_measure"], s["currency"]
    runs = report["runs"]
    fs = s["first_stage"]
    rr = report["rerankers"]
    several = len(rr) > 1 or any(v.get("kind") == "cascade" for v in rr.values())
    if several:
        who = "rerankers " + "; ".join(
            f"{n}: cascade {v['name_or_path']}"
            if v.get("kind") == "cascade"
            else f"{n}: {v['name_or_path']} ({v['pairs_scored']:,} pairs in {v['wall_time_s']:.1f} s, "
            f"{v['pairs_per_s']:.1f} pairs/s)"
            for n, v in rr.items()
        )
    else:
        who = (
            f"reranker {s['reranker']} ({r['pairs_scored']:,} pairs in {r['wall_time_s']:.1f} s, "
            f"{r['pairs_per_s']:.1f} pairs/s end to end)"
        )
    out = [
        f"# What reranking buys: {c['name']}",
        "",
        (
            f"{c['queries_evaluated']} queries, {c['documents']:,} documents; first stage {fs['kind']} top "
            f"{fs['depth']}; {who}. LLM context counted with {s['tokenizer']} at "
            f"{s['price_per_million_tokens']} {cur} per million tokens."
        ),
        "",
        "## Quality per run",
        "",
        _table(
            ["run", "nDCG@10", "MRR@10 (RR@10)", *[f"R@{n}" for n in grid]],
            [
                [
                    n,
                    _f(v["measures"]["nDCG@10"]),
                    _f(v["measures"]["RR@10"]),
                    *[_f(v["measures"][f"R@{m}"]) for m in grid],
                ]
                for n, v in runs.items()
            ],
        ),
        "",
        "## hit@N (Success@N): at least one relevant chunk among the N sent",
        "",
        _table(
            ["run", *[f"Success@{n}" for n in grid]],
            [[n, *[_f(v["measures"][f"Success@{m}"]) for m in grid]] for n, v in runs.items()],
        ),
        "",
        "## LLM context tokens per query when the top N are sent",
        "",
        _table(
            ["run", *[f"N={n}" for n in grid]],
            [
                [n, *[f"{v['llm_context'][str(m)]['mean_tokens_per_query']:,.0f}" for m in grid]]
                for n, v in runs.items()
            ],
        ),
        "",
        f"## The trade-off (quality = {qm}@N)",
        "",
    ]
    rows = []
    for t in report["tradeoff"]:
        nr = t["n_reranked"]
        base, same = t["llm_first_stage_at_n_base"], t["llm_reranked_at_n_reranked"]
        rows.append(
            ([t["reranker"]] if several else [])
            + [
                str(t["n_base"]),
                str(t["k"]),
                _f(t["first_stage_quality_at_n_base"]),
                _f(t["reranked_quality_at_n_base"]),
                f"{t['gain_at_n_base']:+.3f}",
                str(nr) if nr else f"> {s['first_stage']['depth']}",
                str(t["first_stage_n_min"]),
                f"{base['mean_tokens_per_query']:,.0f}",
                f"{same['mean_tokens_per_query']:,.0f}" if same else "-",
                f"{100 * t['llm_tokens_saved_fraction']:.0f}%" if nr else "-",
                _money(base["cost_per_1000_queries"], cur),
                _money(same["cost_per_1000_queries"], cur) if same else "-",
                f"{t['reranker_pairs_scored']:,}",
                _f(t["reranker_seconds_estimated"], 1),
            ]
        )
    out.append(
        _table(
            (["reranker"] if several else [])
            + [
                "N_Base",
                "K",
                f"first stage {qm}@N_Base",
                f"reranked {qm}@N_Base",
                "gain",
                "N_Reranked",
                "first stage alone at N",
                "tokens/query at N_Base",
                "tokens/query at N_Reranked",
                "tokens saved",
                "LLM cost/1k queries at N_Base",
                "at N_Reranked",
                "reranker pairs",
                "reranker s (est.)",
            ],
            rows,
        )
    )
    out += [
        "",
        "N_Reranked: the smallest N at which the reranked run's quality reaches the first stage's at N_Base"
        + (f" (within {s['tolerance']})" if s["tolerance"] else "")
        + ". First stage alone at N: the smallest N "
        "at which the first stage itself already has that quality (savings down to it owe nothing to reranking). "
        "Reranker seconds: its pairs at the measured end-to-end throughput. Runs: runs/<run>.run; judgments: "
        "qrels.txt.",
        "",
        (
            f"## Rerankers side by side (quality = {qm}@N; cost at {s['reranker_price_per_hour']} {cur} per hour of the "
            "scoring hardware)"
        ),
        "",
        _side_by_side(report),
        "",
        (
            "Compute: reranker seconds per 1,000 queries, each model's pairs at its measured pairs/s (a cascade: "
            "summed over its stages). Tokens at N_Reranked: mean LLM context per query."
        ),
        "",
    ]
    if any(v.get("kind") == "cascade" for v in rr.values()):
        out += ["## Cascades: pairs scored per stage, against the last stage's model alone", "", _cascades(report), ""]
    return "\n".join(out)


def _side_by_side(report: dict[str, Any]) -> str:
    """One row per (reranker, K), single models and cascades alike: quality at every N, N_Reranked, tokens at
    N_Reranked and tokens saved per N_Base, pairs scored per query (per stage for a cascade), compute and cost."""
    s = report["settings"]
    grid, qm, cur, n_base = s["n_grid"], s["quality_measure"], s["currency"], s["n_base"]
    n_queries = report["collection"]["queries_evaluated"]
    trade = {(t["reranker"], t["k"], t["n_base"]): t for t in report["tradeoff"]}
    rows = []
    for v in report["runs"].values():
        if v["reranker"] is None:
            continue
        fig = report["rerankers"][v["reranker"]]
        at_k = fig["at_k"][str(v["k"])]
        m = v["measures"]
        cells = [v["reranker"], str(v["k"]), _f(m["nDCG@10"]), *[_f(m[f"{qm}@{n}"]) for n in grid]]
        for nb in n_base:
            t = trade[(v["reranker"], v["k"], nb)]
            same = t["llm_reranked_at_n_reranked"]
            cells.append(str(t["n_reranked"]) if t["n_reranked"] else "-")
            cells.append(f"{same['mean_tokens_per_query']:,.0f}" if same else "-")
            cells.append(f"{100 * t['llm_tokens_saved_fraction']:.0f}%" if t["n_reranked"] else "-")
        if fig.get("kind") == "cascade":
            per_query = " + ".join(f"{st['pairs_scored'] / n_queries:.1f}" for st in at_k["stages"])
            pps = " / ".join(f"{st['pairs_per_s']:.1f}" for st in fig["stages"])
        else:
            per_query, pps = f"{at_k['pairs_scored'] / n_queries:.1f}", f"{fig['pairs_per_s']:.1f}"
        cells += [
            per_query,
            pps,
            _f(at_k["seconds_per_1000_queries"], 1),
            "-" if at_k["cost_per_1000_queries"] is None else _money(at_k["cost_per_1000_queries"], cur),
        ]
        rows.append(cells)
    first = report["runs"]["first_stage"]["measures"]
    rows.insert(
        0,
        [
            "first stage",
            "-",
            _f(first["nDCG@10"]),
            *[_f(first[f"{qm}@{n}"]) for n in grid],
            *["-"] * (3 * len(n_base) + 4),
        ],
    )
    header = ["reranker", "K", "nDCG@10", *[f"{qm}@{n}" for n in grid]]
    for nb in n_base:
        header += [
            f"N_Reranked (N_Base={nb})",
            f"tokens/query at N_Reranked (N_Base={nb})",
            f"tokens saved (N_Base={nb})",
        ]
    header += ["pairs scored/query", "pairs/s", "compute s/1k queries", "reranker cost/1k queries"]
    return _table(header, rows)


def _cascades(report: dict[str, Any]) -> str:
    """One row per (cascade, K): the pairs each stage scored and their compute, the cascade's quality and total
    compute, and the same for its last stage's model alone over all K candidates (when it is an entry too)."""
    s = report["settings"]
    qm, n_base, runs = s["quality_measure"], s["n_base"], report["runs"]
    rows = []
    for name, fig in report["rerankers"].items():
        if fig.get("kind") != "cascade":
            continue
        alone = fig["stages"][-1]["reranker"]
        for k, at_k in fig["at_k"].items():
            m = runs[f"{name}_k{k}"]["measures"]
            stages = "; ".join(
                f"{st['stage']}: {st['pairs_scored']:,} pairs, {_f(st['compute_s'], 1)} s" for st in at_k["stages"]
            )
            cells = [
                name,
                k,
                stages,
                _f(at_k["compute_s"], 1),
                _f(m["nDCG@10"]),
                *[_f(m[f"{qm}@{nb}"]) for nb in n_base],
            ]
            single = runs.get(f"{alone}_k{k}") if alone else None
            if single is None:
                cells += ["-"] * (4 + len(n_base) + 1)
            else:
                sm, sc = single["measures"], single["reranker_seconds_estimated"]
                ratio = at_k["compute_s"] / sc if sc and at_k["compute_s"] is not None else None
                cells += [
                    alone,
                    f"{single['reranker_pairs_scored']:,}",
                    _f(sc, 1),
                    _f(sm["nDCG@10"]),
                    *[_f(sm[f"{qm}@{nb}"]) for nb in n_base],
                ]
                cells.append("-" if ratio is None else f"{100 * ratio:.0f}%")
            rows.append(cells)
    header = ["cascade", "K", "pairs scored and compute per stage", "compute s", "nDCG@10"]
    header += [f"{qm}@{nb}" for nb in n_base]
    header += ["last stage's model alone", "its pairs", "its compute s", "its nDCG@10"]
    header += [f"its {qm}@{nb}" for nb in n_base]
    header += ["cascade compute / alone"]
    return _table(header, rows)


def plot(path: Path, report: dict[str, Any], tokens: dict[str, np.ndarray], config: EvalConfig) -> None:
    """Quality at N against mean LLM context tokens per query, for the first stage and every K; hit@N the same;
    and nDCG@10 against reranking compute (seconds per 1,000 queries), a point per K, single models and cascades
    side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qm, depth, grid = config.quality_measure, config.depth, config.n_grid
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    names = list(report["rerankers"])
    several = len(names) > 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dashes = ["-", "--", ":", "-."]
    for name, run in report["runs"].items():
        tok = tokens[name].mean(axis=0) if tokens[name].shape[0] else np.zeros(depth)
        m = run["measures"]
        if name == FIRST_STAGE:
            style = {"color": "black", "linewidth": 2.2}
            label = "first stage"
        elif several:  # a colour per reranker, a line style per K
            ki = config.k_values.index(run["k"])
            style = {
                "linewidth": 1.4,
                "color": colors[names.index(run["reranker"]) % len(colors)],
                "linestyle": dashes[ki % len(dashes)],
            }
            label = f"{run['reranker']}, K={run['k']}"
        else:
            style = {"linewidth": 1.4}
            label = f"reranked, K={run['k']}"
        curve = [m[f"{qm}@{n}"] for n in range(1, depth + 1)]
        (line,) = axes[0].plot(tok, curve, label=label, **style)
        axes[0].scatter([tok[n - 1] for n in grid], [m[f"{qm}@{n}"] for n in grid], s=14, color=line.get_color())
        axes[1].plot(
            [tok[n - 1] for n in grid],
            [m[f"Success@{n}"] for n in grid],
            marker="o",
            markersize=3,
            label=label,
            color=line.get_color(),
            linewidth=style["linewidth"],
            linestyle=style.get("linestyle", "-"),
        )
    first_tok = tokens[FIRST_STAGE].mean(axis=0) if tokens[FIRST_STAGE].shape[0] else np.zeros(depth)
    for n in grid:
        axes[0].annotate(
            f"N={n}",
            (first_tok[n - 1], report["runs"][FIRST_STAGE]["measures"][f"{qm}@{n}"]),
            fontsize=7,
            xytext=(3, -9),
            textcoords="offset points",
        )
    for ax, ylabel in zip(axes[:2], (f"{qm}@N", "hit@N (Success@N)")):
        ax.set_xscale("log")
        ax.set_xlabel("LLM context tokens per query (top N chunks)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _plot_compute(axes[2], report, names, colors)
    fig.suptitle(f"{report['collection']['name']}: quality against LLM context and reranking compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_compute(ax: Any, report: dict[str, Any], names: list[str], colors: list[str]) -> None:
    """nDCG@10 against compute per 1,000 queries: a line over K per reranker (squares: cascades), the first
    stage as a horizontal line (no reranking compute)."""
    ax.axhline(report["runs"][FIRST_STAGE]["measures"]["nDCG@10"], color="black", linewidth=2.2, label="first stage")
    plotted = False
    for i, name in enumerate(names):
        fig = report["rerankers"][name]
        points = [
            (at_k["seconds_per_1000_queries"], report["runs"][f"{name}_k{k}"]["measures"]["nDCG@10"], k)
            for k, at_k in fig["at_k"].items()
            if at_k["seconds_per_1000_queries"]
        ]
        if not points:
            continue
        plotted = True
        cascade = fig.get("kind") == "cascade"
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="s" if cascade else "o",
            linestyle="--" if cascade else "-",
            color=colors[i % len(colors)],
            label=f"{name} (cascade)" if cascade else name,
        )
        for x, y, k in points:
            ax.annotate(f"K={k}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if plotted:
        ax.set_xscale("log")
    ax.set_xlabel("reranking compute, seconds per 1,000 queries (measured pairs/s)")
    ax.set_ylabel("nDCG@10")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
