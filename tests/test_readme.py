"""The README's and doc/tuning.md's links and names stay true to the repository."""
import re
from pathlib import Path

import pytest

from model import BUILDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCUMENTS = [ROOT / "README.md", ROOT / "doc" / "tuning.md"]


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


def test_github_anchor():
    assert github_anchor("6. Results") == "6-results"
    assert github_anchor("4. Regularisation and optimizer") == "4-regularisation-and-optimizer"
    assert github_anchor("6. Beyond the rules: 30 epochs, and the data") == "6-beyond-the-rules-30-epochs-and-the-data"


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


def test_readme_links_the_tuning_narrative_and_it_links_back():
    assert "](doc/tuning.md" in README
    assert "](../README.md" in (ROOT / "doc" / "tuning.md").read_text()


def test_readme_names_every_build():
    assert [b for b in BUILDS if f"`{b}`" not in README] == []
