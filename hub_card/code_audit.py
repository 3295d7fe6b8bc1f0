"""`audit_published_code`: static checks on the Python files of a Hub folder before anyone runs them.

Users run this code with `trust_remote_code=True`, so it must be boring: imports only from an allow-list (torch,
transformers, safetensors, huggingface_hub, numpy, PIL, tokenizers, packaging (a dependency of transformers,
for the version guard) and the standard library, minus its network,
process and pickle modules), no `eval`/`exec`/`compile`/`__import__`, no pickle (`torch.load` included), no Hub
download helpers, and relative imports only in the flat `from .module import X` form.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ALLOWED_PACKAGES = frozenset(
    {"torch", "transformers", "safetensors", "huggingface_hub", "numpy", "PIL", "tokenizers", "packaging"}
)
# standard-library modules that reach the network, spawn processes, load native code or unpickle
FORBIDDEN_STDLIB = frozenset(
    {
        "socket",
        "ssl",
        "socketserver",
        "http",
        "urllib",
        "ftplib",
        "smtplib",
        "poplib",
        "imaplib",
        "telnetlib",
        "xmlrpc",
        "webbrowser",
        "asyncio",
        "subprocess",
        "multiprocessing",
        "ctypes",
        "pickle",
        "_pickle",
        "cPickle",
        "marshal",
        "shelve",
        "copyreg",
    }
)
FORBIDDEN_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "breakpoint"})
# attribute / name uses that download, upload or unpickle
FORBIDDEN_NAMES = frozenset(
    {
        "hf_hub_download",
        "snapshot_download",
        "HfApi",
        "HfFileSystem",
        "InferenceClient",
        "get_session",
        "cached_file",
        "urlopen",
        "load",  # only as `torch.load` (checked below)
    }
)


def _top(name: str) -> str:
    return name.split(".")[0]


def _import_problems(node: ast.AST, where: str) -> list[str]:
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            if node.level != 1 or node.module is None or "." in node.module:
                return [f"{where}: relative import must be `from .module import X`"]
            return []
        names = [node.module or ""]
        for alias in node.names:
            if alias.name in FORBIDDEN_NAMES - {"load"}:
                return [f"{where}: imports {alias.name!r} (network access)"]
    problems = []
    for name in names:
        top = _top(name)
        if top in FORBIDDEN_STDLIB:
            problems.append(f"{where}: imports forbidden module {name!r}")
        elif top not in ALLOWED_PACKAGES and top not in sys.stdlib_module_names and top != "__future__":
            problems.append(f"{where}: imports {name!r}, which is outside the allow-list")
    return problems


def audit_source(source: str, filename: str, local_modules: set[str]) -> list[str]:
    """Problems found in one file; `local_modules` are the stems of the folder's own `.py` files."""
    tree = ast.parse(source, filename=filename)
    problems = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            problems += _import_problems(node, where)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module not in local_modules:
                problems.append(f"{where}: imports .{node.module}, which is not in the folder")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_BUILTINS:
            problems.append(f"{where}: uses {node.id}()")
        elif isinstance(node, ast.Attribute):
            if node.attr in FORBIDDEN_BUILTINS:
                problems.append(f"{where}: uses .{node.attr}")
            elif node.attr == "load" and isinstance(node.value, ast.Name) and node.value.id == "torch":
                problems.append(f"{where}: uses torch.load (unpickles)")
            elif node.attr in FORBIDDEN_NAMES - {"load"}:
                problems.append(f"{where}: uses .{node.attr} (network access)")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES - {"load"}:
            problems.append(f"{where}: uses {node.id} (network access)")
    return problems


def audit_published_code(folder) -> list[str]:
    """Problems found in every `.py` file at the root of `folder` (empty list: the code passes)."""
    files = sorted(Path(folder).glob("*.py"))
    local = {path.stem for path in files}
    problems = []
    for path in files:
        problems += audit_source(path.read_text(encoding="utf-8"), path.name, local)
    return problems


__all__ = ["ALLOWED_PACKAGES", "FORBIDDEN_STDLIB", "audit_published_code", "audit_source"]
