"""The layout's two laws, read from the source with ``ast`` (nothing is imported).

(a) The import graph of ``audit`` and ``callbacks`` (shipped as ``audit.callbacks``) has no
    cycle. Every import of an audit module counts: top level and inside functions (an import
    inside a function that breaks a cycle still is one). Only ``if TYPE_CHECKING:`` blocks,
    which never run, are left out.
(b) No private name crosses a module boundary: no ``from audit.x import _name``, no
    ``audit.x._name`` / ``x._name`` on an imported audit module, and no private module
    (``audit.methods._common``) imported from outside its own package. A package's
    ``__init__`` may re-export from its own private modules: that is how a package keeps
    its helpers private and its API public.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# repository folder -> the package it ships as (pyproject's package-dir)
PACKAGES = {"audit": "audit", "callbacks": "audit.callbacks"}


@dataclass(frozen=True)
class Source:
    name: str  # dotted module name, e.g. "audit.gate.cli"
    path: Path
    is_package: bool  # an __init__.py


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the audit module the statement loads
    names: tuple[str, ...]  # what it takes from the target ("" for a plain ``import``)
    line: int


def sources(root: Path = ROOT) -> dict[str, Source]:
    """Every module of the shipped packages, by dotted name."""
    out: dict[str, Source] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            out[name] = Source(name, path, is_package)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _absolute(src: Source, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = src.name.split(".")
    if not src.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: dict[str, Source]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def imports(src: Source, modules: dict[str, Source]) -> Iterator[Import]:
    """The audit modules that ``src`` loads, one entry per (statement, module)."""
    tree = ast.parse(src.path.read_text(encoding="utf-8"), str(src.path))
    skipped = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, modules)
                if target and target != src.name:
                    yield Import(src.name, target, ("",), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(src, node)
            if not base.startswith("audit"):
                continue
            taken: dict[str, list[str]] = {}
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # ``from audit import gate``: the submodule itself
                    taken.setdefault(sub, []).append("")
                else:
                    target = _known(base, modules)
                    if target:
                        taken.setdefault(target, []).append(alias.name)
            for target, names in taken.items():
                if target != src.name:
                    yield Import(src.name, target, tuple(names), node.lineno)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = sources(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for src in modules.values():
        for imp in imports(src, modules):
            graph[src.name].add(imp.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _package_of(name: str, modules: dict[str, Source]) -> str:
    src = modules[name]
    return name if src.is_package else name.rpartition(".")[0]


def _private_module(target: str, importer: str, modules: dict[str, Source]) -> str | None:
    """The first private component of ``target`` whose package ``importer`` is outside of."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _private(part):
            owner = ".".join(parts[:i])  # the package that holds the private module
            inside = importer == owner or importer.startswith(owner + ".")
            return None if inside else ".".join(parts[: i + 1])
    return None


def _bound_modules(tree: ast.AST, src: Source, modules: dict[str, Source]) -> dict[str, str]:
    """Local names bound to audit modules by imports: ``from audit import job`` -> job."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(src, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    return bound


def _dotted(node: ast.AST) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def private_uses(root: Path = ROOT) -> list[str]:
    """Every use of another module's private name, as ``importer:line: what``."""
    modules = sources(root)
    found: list[str] = []
    for src in modules.values():
        for imp in imports(src, modules):
            where = f"{src.name}:{imp.line}"
            private_module = _private_module(imp.target, src.name, modules)
            if private_module:
                found.append(f"{where}: imports {imp.target} (private module {private_module})")
            reexport = src.is_package and imp.target.startswith(src.name + ".")
            for name in imp.names:
                if _private(name) and not reexport:
                    found.append(f"{where}: from {imp.target} import {name}")
        tree = ast.parse(src.path.read_text(encoding="utf-8"), str(src.path))
        bound = _bound_modules(tree, src, modules)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or isinstance(
                getattr(node, "ctx", None), ast.Store
            ):
                continue
            chain = _dotted(node)
            if not chain or chain[0] not in bound:
                continue
            module = bound[chain[0]]
            for part in chain[1:]:
                if module == src.name:
                    break
                if _private(part) and f"{module}.{part}" not in modules:
                    found.append(f"{src.name}:{node.lineno}: {module}.{part}")
                    break
                if f"{module}.{part}" not in modules:
                    break
                module = f"{module}.{part}"
    return sorted(set(found))


# ----------------------------------------------------------------------------- the laws


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, (
        "import cycles (move the shared part to a module both can import):\n"
        + "\n".join(" <-> ".join(c) for c in found)
    )


def test_no_private_name_crosses_a_module() -> None:
    found = private_uses()
    assert not found, (
        "private names used across modules (make the helper public where both import it):\n"
        + ("\n".join(found))
    )


# ----------------------------------------------------------------------------- the checks can fail


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (tmp_path / "callbacks").mkdir(exist_ok=True)
    return tmp_path


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "audit/__init__.py": "",
            "audit/a.py": "from audit.b import f\n",
            "audit/b.py": "def f():\n    from audit import a\n    return a\n",
            "audit/c.py": "from audit import a\n",
        },
    )
    assert cycles(import_graph(root)) == [["audit.a", "audit.b"]]


def test_a_cycle_under_type_checking_is_not_one(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "audit/__init__.py": "",
            "audit/a.py": "from audit.b import f\n",
            "audit/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from audit.a import X\n",
        },
    )
    assert cycles(import_graph(root)) == []


def test_private_names_across_modules_are_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "audit/__init__.py": "",
            "audit/x.py": "def _helper():\n    pass\n",
            "audit/y.py": "from audit.x import _helper\n",
            "audit/z.py": "from audit import x\n\ndef g():\n    return x._helper()\n",
            "audit/w.py": "import audit.x\n\ndef g():\n    return audit.x._helper()\n",
            "audit/pkg/__init__.py": "from audit.pkg._impl import _thing, run\n",
            "audit/pkg/_impl.py": "def run():\n    pass\n\n_thing = 1\n",
            "audit/pkg/user.py": "from audit.pkg._impl import run\n",
            "audit/outside.py": "from audit.pkg._impl import run\n",
        },
    )
    assert private_uses(root) == [
        "audit.outside:1: imports audit.pkg._impl (private module audit.pkg._impl)",
        "audit.w:4: audit.x._helper",
        "audit.y:1: from audit.x import _helper",
        "audit.z:4: audit.x._helper",
    ]
