"""The package's modules import each other without a cycle, counted on the installed layout
(`modeling_deft_llava.*`, pyproject's package-dir mapping), imports inside functions included: a cycle closed by an
import hidden in a function is still a cycle. `python benchmarks/code_structure.py` prints the whole graph."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/

from benchmarks.code_structure import import_graph, module_files, strongly_connected  # noqa: E402

PACKAGE = "modeling_deft_llava"


def test_every_installed_package_is_read():
    modules = module_files()
    for package in (
        "configuration",
        "processing",
        "training",
        "hub_card",
        "serving",
        "compressors",
        "deft",
        "commands",
        "utilities",
    ):
        assert f"{PACKAGE}.{package}" in modules, package
    assert f"{PACKAGE}.configuration.deft_settings" in modules
    assert f"{PACKAGE}.compressors.placeholder_policy" in modules


def test_no_import_cycle_among_the_package_modules():
    graph, _ = import_graph()
    assert strongly_connected(graph) == []


def test_the_settings_data_imports_nothing_of_the_project():
    # every layer reads the settings and the rounding rule: they must sit below every method
    graph, _ = import_graph()
    assert graph[f"{PACKAGE}.configuration.deft_settings"] == set()


def test_the_walk_finds_a_cycle_closed_inside_a_function(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackages = ["pkg", "pkg.low"]\n'
        '[tool.setuptools.package-dir]\n"pkg" = "pkg"\n"pkg.low" = "low"\n'
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "low").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "high.py").write_text("from .low.data import X\n")
    (tmp_path / "low" / "__init__.py").write_text("")
    (tmp_path / "low" / "data.py").write_text("X = 1\n\n\ndef f():\n    from ..high import Y  # hidden\n")
    graph, in_functions = import_graph(tmp_path)
    assert strongly_connected(graph) == [["pkg.high", "pkg.low.data"]]
    assert in_functions == [("pkg.low.data", "pkg.high", 5)]


def test_nothing_below_the_commands_imports_them():
    graph, _ = import_graph()
    below = {
        module: sorted(t for t in targets if t.startswith(f"{PACKAGE}.commands"))
        for module, targets in graph.items()
        if not module.startswith(f"{PACKAGE}.commands")
    }
    assert {module: found for module, found in below.items() if found} == {}


def test_the_shared_utilities_import_nothing_of_the_project():
    graph, _ = import_graph()
    utilities = {m: t for m, t in graph.items() if m.startswith(f"{PACKAGE}.utilities")}
    assert f"{PACKAGE}.utilities.atomic_write" in utilities
    assert {m: sorted(t) for m, t in utilities.items() if t - {f"{PACKAGE}.utilities"}} == {}
