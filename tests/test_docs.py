"""The documentation against the repository: README.md and docs/*.md.

- every relative Markdown link reaches a file, and an anchor (`page.md#heading`) a heading of that page (GitHub's
  slugs); the README links every docs page;
- every project path named in backticks (`pipelines/...`, `conf/...`, `jobs/...`, `tests/...`, optionally
  `path.py:name`) exists, and so does every `pipelines.*` module named in backticks or run with `python -m`;
- every config key named in backticks or after `--set` is a field of the pydantic configs of pipelines/config.py
  (RerankJobConfig, ServeAppConfig, EvalConfig, walked through their nested models), and the tables of
  docs/configuration.md document every field of them.

Plain file reads and pydantic's field tables: no Ray, no model, well under a second.
"""

from __future__ import annotations

import ast
import re
import typing
from functools import cache
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------- reading Markdown


@cache
def _split(page: Path) -> tuple[str, str]:
    """(prose, code): the page with fenced code blocks blanked out, and the fenced blocks' lines alone. Line
    numbers are kept in both, so a message can point at the line."""
    prose, code, fence = [], [], None
    for line in page.read_text(encoding="utf-8").splitlines():
        marker = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)
            prose.append("")
            code.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
                code.append("")
            else:
                code.append(line)
            prose.append("")
        else:
            prose.append(line)
            code.append("")
    return "\n".join(prose), "\n".join(code)


_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _code_spans(page: Path) -> list[tuple[int, str]]:
    """Inline code spans of the prose (they may wrap onto the next line), with their line numbers."""
    prose, _ = _split(page)
    return [(_line(prose, m.start()), m.group(2).replace("\n", " ")) for m in _CODE_SPAN.finditer(prose)]


def _without_code_spans(text: str) -> str:
    return _CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (code spans and links as their text), lower case, every
    character but letters, digits, `_`, `-` and spaces dropped, spaces as hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    prose, _ = _split(page)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", prose, re.MULTILINE):
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(page: Path) -> list[tuple[int, str]]:
    prose = _without_code_spans(_split(page)[0])
    return [(_line(prose, m.start()), m.group(1)) for m in _LINK.finditer(prose)]


def _broken_link(page: Path, target: str) -> str | None:
    """Why a link target does not resolve, or None when it does (web links are not followed)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
        return None
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"no such file {path}"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"no heading #{anchor} in {_rel(dest)} (its anchors: {', '.join(sorted(anchors(dest)))})"
    return None


def test_github_slugs():
    assert github_slug("Output (`output.uri`)") == "output-outputuri"
    assert github_slug("On a cluster: `serve deploy`") == "on-a-cluster-serve-deploy"
    assert github_slug("The engine's host side and the simulated accelerator") == (
        "the-engines-host-side-and-the-simulated-accelerator"
    )
    assert github_slug("Kubernetes (KubeRay v1): `conf/kuberay/`") == "kubernetes-kuberay-v1-confkuberay"


def test_every_relative_link_reaches_a_file_and_heading():
    broken = [
        f"{_rel(page)}:{line}: ({target}) {why}"
        for page in PAGES
        for line, target in _links(page)
        if (why := _broken_link(page, target))
    ]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_links_every_docs_page():
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for _, target in _links(ROOT / "README.md")
        if target.startswith("docs/")
    }
    missing = [_rel(page) for page in PAGES[1:] if page.resolve() not in linked]
    assert not missing, f"docs pages the README's reference map does not link: {missing}"


# ---------------------------------------------------------------------------------------------- project paths

_PATH = re.compile(r"(?<![\w./-])((?:pipelines|conf|jobs|tests)/[\w./*-]*)(?::(\w+))?")

# Paths in backticks that are not meant to exist, each with the reason.
NOT_PROJECT_PATHS = {
    "conf/x.yaml": "the file name in the example of an unknown-key error message",
}


def _names_in(py: Path) -> set[str]:
    """Top-level names a module defines or imports, and the names in its __all__ (lazy exports included)."""
    tree = ast.parse(py.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                names.update(e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _missing_path(path: str, name: str | None) -> str | None:
    if "*" in path:
        return None if list(ROOT.glob(path)) else f"{path} matches no file"
    target = ROOT / path
    if not target.exists():
        return f"no such path {path}"
    if name and target.suffix == ".py" and name not in _names_in(target):
        return f"{path} defines no {name}"
    return None


def named_paths() -> list[tuple[str, str | None, str]]:
    """(path, name or None, where) for every project path the pages name in backticks."""
    found = []
    for page in PAGES:
        for line, span in _code_spans(page):
            for m in _PATH.finditer(span):
                found.append((m.group(1).rstrip("."), m.group(2), f"{_rel(page)}:{line}"))
    return found


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _missing_module(dotted: str, attr: str | None, run: bool) -> str | None:
    """Why `pipelines.a.b[.name][:attr]` does not resolve: the longest prefix that is a module, then a name it
    defines or imports. `run`: it is run with `python -m`, so it needs a module file or a package __main__."""
    parts = dotted.split(".")
    if run:
        base = ROOT.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__main__.py").is_file():
            return None
        return f"python -m {dotted}: neither {dotted.replace('.', '/')}.py nor a package __main__.py"
    for i in range(len(parts), 0, -1):
        module = _module_file(parts[:i])
        if module is None:
            continue
        rest = parts[i:] + ([attr] if attr else [])
        if rest and rest[0] not in _names_in(module):
            return f"no module {'.'.join(parts[: i + 1])}, and {_rel(module)} defines or imports no {rest[0]}"
        return None
    return f"no module {dotted}"


_MODULE = re.compile(r"(?<![\w./@$-])(pipelines(?:\.\w+)*)(?::(\w+))?")
_RUN = re.compile(r"python3? -m (pipelines(?:\.\w+)*)")


def named_modules() -> list[tuple[str, str | None, bool, str]]:
    """(module, attribute or None, run with -m, where) for `pipelines.*` names in backticks and `python -m`."""
    found = []
    for page in PAGES:
        for line, span in _code_spans(page):
            for m in _MODULE.finditer(span):
                if "." in m.group(1) or m.group(2):
                    found.append((m.group(1), m.group(2), False, f"{_rel(page)}:{line}"))
        for text in _split(page):
            for m in _RUN.finditer(text):
                found.append((m.group(1), None, True, f"{_rel(page)}:{_line(text, m.start())}"))
    return found


def test_named_project_paths_exist():
    assert named_paths(), "found no project path in the pages: the pattern is broken"
    missing = [
        f"{where}: {why}"
        for path, name, where in named_paths()
        if path not in NOT_PROJECT_PATHS and (why := _missing_path(path, name))
    ]
    assert not missing, "paths the docs name that the repository lacks:\n" + "\n".join(missing)


def test_named_modules_exist():
    assert named_modules(), "found no pipelines module in the pages: the pattern is broken"
    missing = [
        f"{where}: {why}" for mod, attr, run, where in named_modules() if (why := _missing_module(mod, attr, run))
    ]
    assert not missing, "modules the docs name that the repository lacks:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------------------- config keys

# Dotted names in backticks that start like a config section but are not config keys, each with the reason.
NOT_CONFIG_KEYS = {
    "output.topn": "the example of a misspelt key in the unknown-key error message",
    "model.backend_choice": "a field of _summary.json's model record (the auto choice), not a config key",
    "ray.cluster_utils": "Ray's own module (the multi-node test cluster), not a config key",
}


def _config_roots() -> list[type[BaseModel]]:
    from pipelines.config import EvalConfig, RerankJobConfig, ServeAppConfig

    return [RerankJobConfig, ServeAppConfig, EvalConfig]


def _resolves(annotation: object, parts: list[str]) -> bool:
    """Whether `parts` is a path of fields below a value of this type: Optional/Union tried arm by arm, a list
    as its items, a dict's keys free, a BaseModel through its fields; `*` matches any field of a model."""
    if not parts:
        return True
    origin = typing.get_origin(annotation)
    if origin is not None:
        args = typing.get_args(annotation)
        if origin is dict:
            return True
        if origin is list:
            return _resolves(args[0], parts)
        if origin is typing.Annotated:
            return _resolves(args[0], parts)
        return any(_resolves(a, parts) for a in args)  # Union, X | None, Literal (never a model)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        head, rest = parts[0], parts[1:]
        if head == "*":
            return not rest
        field = annotation.model_fields.get(head)
        return field is not None and _resolves(field.annotation, rest)
    return False


def config_key_known(key: str) -> bool:
    return any(_resolves(root, key.split(".")) for root in _config_roots())


def config_sections() -> set[str]:
    return {name for root in _config_roots() for name in root.model_fields}


_KEY = re.compile(r"(?<![\w./@$:-])([a-z_][a-z0-9_]*(?:\.(?:[a-z0-9_]+|\*))+)(?![\w(])")
_SET = re.compile(r"--set[ =]([A-Za-z_][\w.]*)=")
_FILE_SUFFIX = re.compile(r"\.(json|md|png|ya?ml|py|txt|parquet|tsv|jsonl|toml)$")


def named_config_keys() -> list[tuple[str, str]]:
    """(key, where) for every dotted name in backticks whose first part is a config section, and every key
    given to `--set` (in prose or code blocks)."""
    sections = config_sections()
    found = []
    for page in PAGES:
        for line, span in _code_spans(page):
            for m in _KEY.finditer(span):
                key = m.group(1)
                if key.split(".")[0] in sections and not _FILE_SUFFIX.search(key):
                    found.append((key, f"{_rel(page)}:{line}"))
        for text in _split(page):
            for m in _SET.finditer(text):
                if m.group(1).split(".")[0] in sections:
                    found.append((m.group(1), f"{_rel(page)}:{_line(text, m.start())}"))
    return found


def reference_keys() -> list[tuple[str, str]]:
    """(key, where) for the first cell of every table row of docs/configuration.md: the keys it documents. A
    cell's span that starts with a dot continues the key before it (`first_stage.bm25.k1` / `.b`)."""
    page = ROOT / "docs" / "configuration.md"
    prose, _ = _split(page)
    found = []
    for number, line in enumerate(prose.splitlines(), 1):
        cells = line.split("|")
        if not line.startswith("|") or len(cells) < 3 or set(cells[1].strip()) <= {"-", ":"}:
            continue
        previous = ""
        for m in _CODE_SPAN.finditer(cells[1]):
            key = m.group(2).strip()
            if key.startswith(".") and previous:
                key = previous.rsplit(".", 1)[0] + key
            found.append((key, f"{_rel(page)}:{number}"))
            previous = key
    return found


def config_leaves(annotation: object, prefix: str = "") -> list[str]:
    """The path of every value below a config type that is not itself a section (lists as their items)."""
    origin = typing.get_origin(annotation)
    if origin is dict:
        return [prefix.rstrip(".")]
    if origin is not None:
        return [p for arg in typing.get_args(annotation) for p in config_leaves(arg, prefix)]
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return [prefix.rstrip(".")] if prefix else []
    return [p for name, f in annotation.model_fields.items() for p in config_leaves(f.annotation, f"{prefix}{name}.")]


def test_config_key_resolution():
    assert config_key_known("model.max_batch_tokens")
    assert config_key_known("first_stage.bm25.k1")  # nested model
    assert config_key_known("first_stage.model.kind")  # Optional[ModelConfig]
    assert config_key_known("rerankers.model.name_or_path")  # list[RerankerSpec]
    assert config_key_known("serve.autoscaling.max_replicas")  # Optional[ServeAutoscalingConfig]
    assert config_key_known("scale.*") and config_key_known("k_values")
    assert not config_key_known("output.topn")
    assert not config_key_known("model.max_length.x")  # below a leaf
    assert not config_key_known("serve.port.*")


def test_named_config_keys_exist():
    keys = named_config_keys()
    assert len(keys) > 100, f"found only {len(keys)} config keys in the pages: the pattern is broken"
    unknown = [f"{where}: {key}" for key, where in keys if key not in NOT_CONFIG_KEYS and not config_key_known(key)]
    assert not unknown, "config keys the docs name that pipelines/config.py lacks:\n" + "\n".join(unknown)


def test_the_reference_tables_name_real_keys():
    keys = reference_keys()
    assert len(keys) > 100, f"found only {len(keys)} keys in the tables of docs/configuration.md"
    unknown = [f"{where}: {key}" for key, where in keys if not config_key_known(key)]
    assert not unknown, "docs/configuration.md documents keys pipelines/config.py lacks:\n" + "\n".join(unknown)


def test_the_reference_documents_every_key():
    """Every field of the three configs has a row, its own or a section's (`serve.autoscaling` covers its
    sub-keys, `scale.*` a whole section)."""
    documented = {key for key, _ in reference_keys()}

    def covered(path: str) -> bool:
        parts = path.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        return bool(prefixes & documented) or any(f"{p}.*" in documented for p in prefixes)

    leaves = {p for root in _config_roots() for p in config_leaves(root)}
    assert {"model.name_or_path", "first_stage.bm25.b", "rerankers.name", "serve.autoscaling.min_replicas"} <= leaves
    undocumented = sorted(p for p in leaves if not covered(p))
    assert not undocumented, f"config keys docs/configuration.md does not document: {undocumented}"


def test_the_allowlists_are_still_needed():
    named = {key for key, _ in named_config_keys()}
    stale = sorted(set(NOT_CONFIG_KEYS) - named)
    assert not stale, f"NOT_CONFIG_KEYS entries no page names any more: {stale}"
    stale = sorted(set(NOT_PROJECT_PATHS) - {path for path, _, _ in named_paths()})
    assert not stale, f"NOT_PROJECT_PATHS entries no page names any more: {stale}"
    real = sorted(k for k in NOT_CONFIG_KEYS if config_key_known(k))
    assert not real, f"NOT_CONFIG_KEYS entries that are config keys after all: {real}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_unclosed_code_fence(page):
    fences = [line for line in page.read_text(encoding="utf-8").splitlines() if re.match(r"^\s*```", line)]
    assert len(fences) % 2 == 0, f"{_rel(page)} has an unclosed ``` fence"
