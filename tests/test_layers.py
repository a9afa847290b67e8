"""The layout shows the architecture: each package's imports point down the layers, and no import circle exists.

Layers, top to bottom (a module may import its own layer and the ones below it):

    apps     pipelines.cli, pipelines.job, pipelines.serve, pipelines.evaluation
    engine   pipelines.engine (the only layer that talks to Ray)
    model    pipelines.model          io    pipelines.io        (neither imports the other's siblings above;
                                                                  model may read bundled data through io)
    base     pipelines.config, pipelines.errors

The public re-exports (pipelines.dataset, pipelines.scoring) sit beside the apps. Imports are read with `ast`
from the source (function-level imports included; `if TYPE_CHECKING:` blocks, which never run, excluded from the
circle check only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pipelines"

APPS = ("pipelines.cli", "pipelines.job", "pipelines.serve", "pipelines.evaluation")
PUBLIC = ("pipelines.dataset", "pipelines.scoring")
RAY_FREE = ("pipelines.model", "pipelines.io", "pipelines.config", "pipelines.errors")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, runs at import or call time) for every import in a file; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base]
            # `from pipelines.x import y` where y is a module of x
            for a in node.names:
                candidate = f"{base}.{a.name}"
                if _is_module(candidate):
                    names.append(candidate)
        for n in names:
            out.append((n, node.lineno not in skip))
    return out


def _is_module(name: str) -> bool:
    if not name.startswith("pipelines"):
        return False
    p = ROOT.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_model_and_io_layers_import_no_ray_engine_app_or_evaluation():
    bad = []
    for name, path in all_modules().items():
        if not _under(name, RAY_FREE):
            continue
        for imported, _ in imports_of(path):
            if imported == "ray" or imported.startswith("ray."):
                bad.append(f"{name} imports {imported}")
            if _under(imported, ("pipelines.engine", *APPS, *PUBLIC)):
                bad.append(f"{name} imports {imported}")
    assert not bad, "upward or Ray imports in the model/io layers:\n" + "\n".join(bad)


def test_config_and_errors_import_nothing_of_the_project_above_them():
    for name in ("pipelines.config", "pipelines.errors"):
        for imported, _ in imports_of(all_modules()[name]):
            assert not imported.startswith("pipelines.") or imported in ("pipelines.errors",), (name, imported)


def test_model_and_io_do_not_import_each_other_except_bundled_data():
    """model may read the bundled calibration data through io.collections; io never imports the model."""
    bad = []
    for name, path in all_modules().items():
        for imported, _ in imports_of(path):
            if _under(name, ("pipelines.io",)) and _under(imported, ("pipelines.model",)):
                bad.append(f"{name} imports {imported}")
            if (
                _under(name, ("pipelines.model",))
                and _under(imported, ("pipelines.io",))
                and imported != "pipelines.io.collections"
            ):
                bad.append(f"{name} imports {imported}")
    assert not bad, "\n".join(bad)


def test_engine_imports_no_app():
    bad = []
    for name, path in all_modules().items():
        if _under(name, ("pipelines.engine",)):
            bad += [f"{name} imports {i}" for i, _ in imports_of(path) if _under(i, (*APPS, *PUBLIC))]
    assert not bad, "\n".join(bad)


def test_apps_do_not_import_the_public_re_exports():
    """The re-export modules are for users; the code imports the real homes, so there is one name per thing."""
    bad = []
    for name, path in all_modules().items():
        if name in PUBLIC:
            continue
        bad += [f"{name} imports {i}" for i, _ in imports_of(path) if i in PUBLIC]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imported, runs in imports_of(path):
            if runs and imported in modules and imported != name:
                deps.add(imported)
        # a package's __init__ is imported with any module under it: not a dependency of its own children
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each listed."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("public", ["pipelines.dataset", "pipelines.scoring", "pipelines.config", "pipelines.job"])
def test_public_import_paths_keep_working(public):
    import importlib

    module = importlib.import_module(public)
    wanted = {
        "pipelines.dataset": "rerank_dataset",
        "pipelines.scoring": "Scorer",
        "pipelines.config": "RerankJobConfig",
        "pipelines.job": "run_rerank",
    }[public]
    assert hasattr(module, wanted)
