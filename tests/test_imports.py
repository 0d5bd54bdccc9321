"""The import graph of fxopt's modules is a DAG, and the core names no built-in pass or lowering.

Every import counts: the ones inside functions (a lazy import hides a cycle from the
interpreter, not from a reader), the ones under ``if TYPE_CHECKING:`` (a type-only import is
still a dependency a reader must follow) and ``importlib.import_module("fxopt...")`` with a
literal name (an import by another spelling).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Modules above the API that drive fxopt like a user does (benchmarks against other systems):
# they may name built-in passes.


def module_files() -> dict[str, Path]:
    files = {}
    for path in (ROOT / "fxopt").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "passes").rglob("*.py"):
        parts = ("fxopt", *path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_module_target(node: ast.AST) -> str | None:
    """The module a call ``importlib.import_module("name")`` (or ``import_module("name")``)
    names, when the name is a literal."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    first = node.args[0]
    if called == "import_module" and isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The fxopt modules ``name`` imports anywhere in its source."""
    return {m for m in imported_names(name, path, known) if m in known and m != name}


def imported_names(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports anywhere in its source (``from a import b``: ``a.b``
    when that is a known module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = import_module_target(node)
        if target is not None:
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return found


def import_graph() -> nx.DiGraph:
    files = module_files()
    graph = nx.DiGraph()
    for name, path in files.items():
        graph.add_node(name)
        for target in imported_modules(name, path, set(files)):
            graph.add_edge(name, target)
    return graph


def test_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "fxopt.lowering" in graph and "fxopt.kernels.int8" in graph
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])


def test_layers_point_down() -> None:
    graph = import_graph()
    reach = {name: nx.descendants(graph, name) for name in graph}
    # api -> pipeline/backends -> lowerings -> kernels, never upwards. The torch.compile frontend
    # is built on the session, never on api; api reaches it only for a model that generates
    # (fxopt.generation), so it must stay free of api.
    for low, high in [("fxopt.kernels.int8", "fxopt.lowering"), ("fxopt.lowering", "fxopt.backends"),
                      ("fxopt.backends.onnx", "fxopt.api"), ("fxopt.backends.eager", "fxopt.api"),
                      ("fxopt.api", "fxopt.frontends.onnx_export"), ("fxopt.frontends.dynamo", "fxopt.api"),
                      ("fxopt.frontends.dynamo", "fxopt.generation")]:
        assert high not in reach[low], f"{low} imports {high}"


@pytest.mark.parametrize("builtin", ["fxopt.passes", "fxopt.lowering.int8_linear", "fxopt.lowering.onednn_linear"])
def test_core_never_imports_a_builtin_pass_or_lowering(builtin: str) -> None:
    graph = import_graph()
    plugins = {n for n in graph if n == builtin or n.startswith(builtin + ".")}
    core = {n for n in graph if n not in plugins and not n.startswith("fxopt.passes")}
    offenders = sorted(n for n in core if set(graph.successors(n)) & plugins)
    assert not offenders, f"{', '.join(offenders)} import {builtin} (found through entry points instead)"


def test_core_never_imports_the_benchmark() -> None:
    # ``fxopt bench`` is the one way in: the CLI hands the subcommand over to fxopt_bench.
    files = module_files()
    offenders = sorted(
        name for name, path in files.items()
        if name != "fxopt.cli" and not name.startswith("fxopt.passes")
        and any(m == "fxopt_bench" or m.startswith("fxopt_bench.") for m in imported_names(name, path, set(files)))
    )
    assert not offenders, f"{', '.join(offenders)} import fxopt_bench"


def test_backends_name_no_pass_or_quantization_scheme() -> None:
    for path in (ROOT / "fxopt" / "backends").glob("*.py"):
        text = path.read_text().lower()
        assert "int8" not in text and "quantiz" not in text, path.name


def test_type_only_and_import_module_imports_count(tmp_path: Path) -> None:
    source = tmp_path / "b.py"
    source.write_text(
        "from __future__ import annotations\n"
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from fxopt.c import Thing\n"
        "def later():\n"
        "    return importlib.import_module('fxopt.d').value\n"
    )
    known = {"fxopt.a", "fxopt.b", "fxopt.c", "fxopt.d"}
    assert imported_modules("fxopt.a.b", source, known) == {"fxopt.c", "fxopt.d"}
