"""The README's and doc/tuning.md's links and names stay true to the repository."""
import json
import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCUMENTS = [ROOT / "README.md", ROOT / "doc" / "tuning.md"]


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_anchor_link_points_at_a_heading(document):
    links = re.findall(r"\]\(#([^)]+)\)", document.read_text())
    assert links, f"{document.name} has no in-page links to check"
    assert [a for a in links if a not in anchors(document)] == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_file_link_exists_and_its_anchor_too(document):
    """Links are relative to the document's own folder; a link into another Markdown file with #anchor
    must name one of that file's headings."""
    targets = {t for t in re.findall(r"\]\(([^)#][^)]*)\)", document.read_text()) if "://" not in t}
    assert targets, f"{document.name} links no files"
    missing, bad_anchors = [], []
    for target in sorted(targets):
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve()
        if not linked.exists():
            missing.append(target)
        elif anchor and anchor not in anchors(linked):
            bad_anchors.append(target)
    assert (missing, bad_anchors) == ([], [])


def test_the_notebooks_are_one_story_written_by_their_generator(load_benchmark):
    """The notebooks' cells are benchmarks/notebooks.py's: one setup cell and REPO_URL, one story."""
    notebooks = load_benchmark("notebooks")
    for norm, name in (("bn", "BatchNorm"), ("ln", "LayerNorm"), ("gn", "GroupNorm")):
        cells = json.loads((ROOT / f"S8_{name}.ipynb").read_text())["cells"]
        assert ["".join(c["source"]) for c in cells] == [c["source"] for c in notebooks.cells(norm)]
        assert any(c.get("outputs") for c in cells), f"S8_{name}.ipynb is committed without its run's outputs"
    assert 'REPO_URL = "' in notebooks.SETUP


def test_every_generated_block_equals_what_the_report_writes_now(load_benchmark):
    """Each <!-- NAME:start --> ... <!-- NAME:end --> block of README.md and doc/*.md is what
    benchmarks/report.py writes from the results files today."""
    stale = load_benchmark("report").stale_blocks()
    assert stale == [], "\n".join(f"{doc}: block {name!r} {why}" for doc, name, why in stale)
