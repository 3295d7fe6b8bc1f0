"""The documentation guides: a short README, every top-level folder in the layout, links that resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Pages that other branches add (the lmms-eval plugin's page); remove a name once its page is merged.
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_readme_is_a_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert not re.search(r"\bissues? #?\d+", readme, flags=re.IGNORECASE), "the README names an issue number"


def test_docs_name_no_issue_numbers_and_no_machine_paths():
    for path in [ROOT / "README.md", *DOCS]:
        text = path.read_text()
        assert not re.search(r"\(issue \d+|\bissue \d+,", text), f"{path.name} names an issue number"
        assert not re.search(r"(?<![\w.])/(work|home|tmp|Users)/", text), (
            f"{path.name} names a machine's path"
        )


def test_layout_lists_every_top_level_folder():
    layout = (ROOT / "docs" / "architecture.md").read_text()
    layout = layout[layout.index("## Layout") : layout.index("\n## ", layout.index("## Layout") + 1)]
    ignored = {"build", "dist", "outputs", "__pycache__"}
    folders = [
        d.name
        for d in ROOT.iterdir()
        if d.is_dir()
        and d.name not in ignored
        and not d.name.endswith(".egg-info")
        and (not d.name.startswith(".") or d.name == ".ci")
    ]
    missing = [name for name in folders if f"`{name}/`" not in layout]
    assert not missing, f"docs/architecture.md's layout leaves out {missing}"


def test_links_between_pages_resolve():
    for page in [ROOT / "README.md", *DOCS]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{page.name} links to {target}: no such heading"
