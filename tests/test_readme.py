"""The README's links and names stay true to the repository."""
import re
from pathlib import Path

from model import BUILDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor():
    assert github_anchor("6. Results") == "6-results"
    assert github_anchor("4. Regularisation and optimizer") == "4-regularisation-and-optimizer"


def test_every_anchor_link_points_at_a_heading():
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", README, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links, "the README has no in-page links to check"
    assert [a for a in links if a not in anchors] == []


def test_every_file_link_exists():
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)#][^)]*)\)", README) if "://" not in t}
    assert targets, "the README links no files"
    assert sorted(t for t in targets if not (ROOT / t).exists()) == []


def test_readme_names_every_build():
    assert [b for b in BUILDS if f"`{b}`" not in README] == []
