"""The project's import graph read from source (no import runs), and the checks the layers test makes on it.

Every import counts, at module level or inside a function: a lazy import still ties the two modules
together. `from a import b` goes to the submodule `a.b` when there is one, else to `a`; relative imports
are resolved against the importing module's package. Only imports of the project's own modules are kept.
"""
from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported project module
    line: int


@dataclass(frozen=True)
class Layer:
    rank: int  # a module may import modules of its own rank or lower
    name: str
    patterns: tuple[str, ...]  # fnmatch patterns over dotted module names


def package_modules(repo: Path) -> dict[str, Path]:
    """Each installed module's dotted name -> its source file, from pyproject.toml's package-dir."""
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools.get("package-dir", {})
    modules = {}
    for package in setuptools["packages"]:
        folder = repo / folders.get(package, package.replace(".", "/"))
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: set[str]) -> str | None:
    """The longest prefix of `name` that is a project module (`a.b.attr` -> `a.b`), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports_in(source: str, module: str, is_package: bool, modules: set[str]) -> list[Import]:
    """Every import of a project module in one module's source, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                found.append(Import(module, target, node.lineno))
    return found


def import_graph(modules: dict[str, Path]) -> list[Import]:
    names = set(modules)
    return [found for name, path in modules.items()
            for found in imports_in(path.read_text(), name, path.stem == "__init__", names)]


def find_cycle(imports: list[Import]) -> list[str] | None:
    """One import circle as its modules in order (the first repeated at the end), or None when there is none."""
    graph: dict[str, set[str]] = {}
    for edge in imports:
        graph.setdefault(edge.source, set()).add(edge.target)
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """Import circles until none is left, each found after the previous one's closing import is set aside."""
    cycles, remaining = [], list(imports)
    while cycle := find_cycle(remaining):
        cycles.append(cycle)
        remaining = [edge for edge in remaining if (edge.source, edge.target) != (cycle[-2], cycle[-1])]
    return cycles


def layer_of(module: str, layers: list[Layer]) -> Layer | None:
    return next((layer for layer in layers if any(fnmatchcase(module, p) for p in layer.patterns)), None)


def layer_problems(modules: list[str], imports: list[Import], layers: list[Layer],
                   forbidden: list[tuple[str, str]]) -> list[str]:
    """One line per module no layer places, per upward import, and per import a (source, target) pattern forbids."""
    problems = [f"place {module} in a layer" for module in sorted(modules) if layer_of(module, layers) is None]
    for edge in sorted(set(imports), key=lambda edge: (edge.source, edge.line, edge.target)):
        source, target = layer_of(edge.source, layers), layer_of(edge.target, layers)
        where = f"{edge.source}:{edge.line} imports {edge.target}"
        if source is None or target is None:
            continue
        if target.rank > source.rank:
            problems.append(f"{where}: {source.name} (layer {source.rank}) may not import "
                            f"{target.name} (layer {target.rank})")
        for source_pattern, target_pattern in forbidden:
            if fnmatchcase(edge.source, source_pattern) and fnmatchcase(edge.target, target_pattern):
                problems.append(f"{where}: {source_pattern} may not import {target_pattern}")
    return problems


def path_edits(source: str) -> list[int]:
    """Lines that change the import path: sys.path changed or assigned, site.addsitedir, PYTHONPATH named."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if owner == "sys.path" or (owner == "site" and node.func.attr == "addsitedir"):
                lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(ast.unparse(target).startswith(("sys.path", "os.environ['PYTHONPATH']")) for target in targets):
                lines.append(node.lineno)
        elif isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
            lines.append(node.lineno)
    return sorted(set(lines))
