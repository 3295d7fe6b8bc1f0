"""The package's structure, measured from its source: the import graph of the installed layout and the length of
every function.

    python benchmarks/code_structure.py            # floors, cycles, arrows between folders, function lengths
    python benchmarks/code_structure.py --json     # the same as JSON
    python benchmarks/code_structure.py --root DIR # another checkout (`git worktree add DIR REV`: before/after)

Module names are those of the installed layout: pyproject's `[tool.setuptools.package-dir]` maps the top-level
folders (`configuration/`, `processing/`, ...) to `modeling_deft_llava.<folder>`. An import names the module it
loads: `from ..configuration.deft_settings import x` is an arrow to `modeling_deft_llava.configuration.deft_settings`
(the parent packages Python runs first are not arrows: every module would then import every `__init__`), and
`from . import name` is an arrow to the sub-module `name` where one exists. Imports inside functions count as
arrows too (a cycle closed inside a function is still a cycle); `if TYPE_CHECKING:` blocks do not (they never run).
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "modeling_deft_llava"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Installed package name -> source folder, from pyproject's package list and package-dir mapping."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = project.get("package-dir", {})
    dirs = {}
    for name in project["packages"]:
        if name in mapping:
            dirs[name] = root / mapping[name]
            continue
        # a sub-package without its own entry lives below its nearest mapped parent
        parent, _, rest = name.rpartition(".")
        parts = [rest]
        while parent and parent not in mapping:
            parent, _, last = parent.rpartition(".")
            parts.insert(0, last)
        base = root / mapping[parent] if parent else root
        dirs[name] = base.joinpath(*parts)
    return dirs


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Installed module name -> file, for every `.py` file of every package (a package's `__init__.py` is the
    package's own name)."""
    modules = {}
    for package, folder in package_dirs(root).items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement that can run (`if TYPE_CHECKING:` bodies left out), with whether it is inside a
    function."""

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    yield from visit_one(orelse, in_function)
                continue
            yield from visit_one(child, in_function)

    def visit_one(child, in_function):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function
        inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        yield from visit(child, inner)

    yield from visit(tree, False)


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> the package modules it imports, [(module, imported module, line)] for imports inside functions)."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    in_functions = []
    for name, path in modules.items():
        is_package = path.stem == "__init__"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, in_function in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module
                # `from pkg import sub` loads the sub-module where `sub` is one
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                    for alias in node.names
                ]
            for target in targets:
                # `import a.b.c.d` where only a.b.c is a module (d a name): the deepest module named
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                    if in_function and (name, target, node.lineno) not in in_functions:
                        in_functions.append((name, target, node.lineno))
    return graph, in_functions


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one an import cycle)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = [0]

    def connect(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 0 imports no package module, otherwise one above the highest module it imports (the
    modules of one cycle share a floor)."""
    component_of = {}
    for number, component in enumerate(strongly_connected(graph)):
        for node in component:
            component_of[node] = number
    key = {node: component_of.get(node, node) for node in graph}
    members: dict[object, list[str]] = {}
    for node in graph:
        members.setdefault(key[node], []).append(node)
    result: dict[object, int] = {}

    def floor(group):
        if group in result:
            return result[group]
        result[group] = 0  # guards the walk; a group never reaches itself (cycles are one group)
        below = {key[other] for node in members[group] for other in graph[node]} - {group}
        result[group] = 1 + max((floor(other) for other in below), default=-1)
        return result[group]

    return {node: floor(key[node]) for node in graph}


def folder_of(module: str) -> str:
    """The room a module lives in: its sub-package (`compressors`, `configuration`, ...); for the model package's
    own modules, `model` (the model classes, `modeling_deft_llava*.py`: the top of the model) or `core` (what the
    model and the methods share: outputs, token layout, input checks, compatibility); `package` for the
    package's `__init__`."""
    parts = module.split(".")
    if len(parts) > 2:
        return parts[1]
    if len(parts) == 2:
        return "model" if parts[1].startswith("modeling_deft_llava") else "core"
    return "package"


def folder_arrows(graph: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    """(importing folder, imported folder) -> number of module arrows, between different folders."""
    arrows: dict[tuple[str, str], int] = {}
    for node, targets in graph.items():
        for target in targets:
            pair = (folder_of(node), folder_of(target))
            if pair[0] != pair[1]:
                arrows[pair] = arrows.get(pair, 0) + 1
    return arrows


def _functions(node, prefix=""):
    """(qualified name, body lines without the docstring) of every function below `node`, nested ones too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            body = child.body
            docstring = isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant
            )
            if docstring and isinstance(body[0].value.value, str) and len(body) > 1:
                body = body[1:]
            qualified = f"{prefix}{child.name}"
            yield qualified, body[-1].end_lineno - body[0].lineno + 1
            yield from _functions(child, f"{qualified}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")


def function_lengths(root: Path = ROOT) -> list[tuple[str, int]]:
    """(module:qualified name, body lines without the docstring) for every function and method of the package."""
    return [
        (f"{name}:{qualified}", lines)
        for name, path in module_files(root).items()
        for qualified, lines in _functions(ast.parse(path.read_text()))
    ]


def report(root: Path = ROOT) -> dict:
    graph, in_functions = import_graph(root)
    cycles = strongly_connected(graph)
    module_floors = floors(graph)
    arrows = folder_arrows(graph)
    folders = {folder_of(m) for m in graph}
    folder_graph = {f: {b for (a, b) in arrows if a == f} for f in folders}
    folder_cycles = strongly_connected(folder_graph)
    folder_floor = floors(folder_graph)
    back_up = sorted(
        f"{a} -> {b} ({n})" for (a, b), n in arrows.items() if folder_floor[b] >= folder_floor[a]
    )
    lengths = sorted((n for _, n in function_lengths(root)), reverse=True)
    named = sorted(function_lengths(root), key=lambda item: -item[1])
    return {
        "modules": len(graph),
        "import arrows": sum(len(t) for t in graph.values()),
        "module cycles": cycles,
        "modules in cycles": sum(len(c) for c in cycles),
        "imports inside functions": [f"{a} -> {b} (line {line})" for a, b, line in in_functions],
        "module floors": max(module_floors.values()) + 1,
        "module floors of each folder (lowest-highest)": {
            f: f"{min(v for m, v in module_floors.items() if folder_of(m) == f)}-"
            f"{max(v for m, v in module_floors.items() if folder_of(m) == f)}"
            for f in sorted(folders)
        },
        "folder floors": {f: folder_floor[f] for f in sorted(folders, key=lambda f: (folder_floor[f], f))},
        "folder arrows": {f"{a} -> {b}": n for (a, b), n in sorted(arrows.items())},
        "folder cycles": folder_cycles,
        "arrows back up (between folders of one cycle)": back_up,
        "functions": len(lengths),
        "function body lines": {
            "median": statistics.median(lengths),
            "p90": lengths[len(lengths) // 10],
            "max": lengths[0],
            "over 50": sum(n > 50 for n in lengths),
            "over 30": sum(n > 30 for n in lengths),
        },
        "longest functions": [f"{n:4d} {where}" for where, n in named[:12]],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    args = parser.parse_args(argv)
    result = report(args.root)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"    {k}: {v}")
        elif isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                print(f"    {item}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
