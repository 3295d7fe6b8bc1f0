"""The results page and the README's results summary are generated from the results JSON and cannot drift.

`python -m benchmarks.render_results` writes both; these tests regenerate them in memory and compare with the
committed files, and check that the templates type no result by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import render_results

ROOT = Path(__file__).resolve().parent.parent


def test_docs_results_page_is_regenerated_from_the_json():
    committed = (ROOT / "docs" / "results.md").read_text()
    assert committed == render_results.results_page(), (
        "docs/results.md differs from the JSON in benchmarks/results/: run python -m benchmarks.render_results"
    )


def test_readme_results_summary_is_regenerated_from_the_json():
    readme = (ROOT / "README.md").read_text()
    assert readme == render_results.readme_with_summary(readme), (
        "README.md's results summary differs from the JSON: run python -m benchmarks.render_results"
    )


def test_check_mode_passes_on_the_committed_files(capsys):
    assert render_results.main(["--check"]) == 0, capsys.readouterr().err


# A result typed into the prose by hand: a decimal percentage, speed-up or size, or a time, outside `{{ ... }}`.
# Whole percentages are budgets, targets and confidence levels ("at 25%", "target <= 2%", "95% interval").
HAND_TYPED = re.compile(r"\d+\.\d+\s?(%|x\b|MB\b|GB\b)|\d+(\.\d+)?\s?(ms|s)\b")


def budgets() -> set[str]:
    """Every retention ratio of the digits JSON, as the pages write it ("12.5%", "48.2%", "6.25%")."""
    names = ("digits_accuracy", "digits_dense_accuracy", "digits_video_accuracy")
    return {render_results.ratio_label(r) for name in names for r in render_results.ratios_of(name, None)}


@pytest.mark.parametrize("template", [render_results.TEMPLATE, render_results.SUMMARY_TEMPLATE])
def test_templates_type_no_result_by_hand(template):
    prose = render_results.PLACEHOLDER.sub("", template.read_text())
    stray = [m.group(0) for m in HAND_TYPED.finditer(prose) if m.group(0) not in budgets()]
    assert not stray, f"{template.name} types results by hand (put them in {{{{ ... }}}}): {stray}"


def test_readme_summary_block_holds_only_generated_numbers():
    readme = (ROOT / "README.md").read_text()
    start = readme.index(render_results.SUMMARY_START) + len(render_results.SUMMARY_START)
    block = readme[start : readme.index(render_results.SUMMARY_END)]
    rendered = render_results.render(render_results.SUMMARY_TEMPLATE.read_text()).strip("\n")
    assert block.strip("\n") == rendered


def test_a_changed_json_value_changes_the_page(monkeypatch):
    """The page really reads the JSON: change one accuracy and the rendered table follows."""
    entry = render_results.row("digits_dense_accuracy", "deft", 0.25)
    monkeypatch.setitem(entry, "accuracy", 0.123)
    assert "12.3%" in render_results.dense_methods_table()
    assert "12.3%" in render_results.render(render_results.SUMMARY_TEMPLATE.read_text())


def test_a_broken_placeholder_names_itself(tmp_path):
    with pytest.raises(ValueError, match="no_such_file"):
        render_results.render('{{ R["no_such_file"]["full"] }}')
