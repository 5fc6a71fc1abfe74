"""The repository works on any clone: the CI entry and its workflow, the notebooks' Colab cell, and
no path or git tag that only the machines that built it have."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_workflow_runs_ci_on_push_and_pull_request_on_colabs_python_too():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))        # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = workflow["jobs"].values()
    assert {"3.11", "3.13"} <= set(job["strategy"]["matrix"]["python-version"])
    steps = job["steps"]
    assert [s["run"] for s in steps if "run" in s] == ["bash .ci/run"]
    uses = {s["uses"].split("@")[0]: s.get("with", {}) for s in steps if "uses" in s}
    assert uses["actions/setup-python"]["cache"] == "pip"
    assert uses["actions/cache"]["path"] == "data"                # CIFAR-10 downloads once
    # the whole history, so that the commit the tuning records name can be checked out
    assert uses["actions/checkout"]["fetch-depth"] == 0


def test_ci_runs_the_readmes_test_command_which_names_no_local_copy():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command:start" in ci and 'eval "$cmd"' in ci
    command = re.search(r"<!-- test-command:start -->\n```\n(.+)\n```", README).group(1)
    assert "S8_DATA" not in command and "ruff check" in command and "pytest" in command


def machine_paths(text):
    """Absolute paths of a machine and the machines' shared folder, as they appear in a text."""
    return re.findall(r"(?:\.\./shared/|/work/|/root/|/home/\w+|\.gpu/)[\w./-]*", text)


def test_no_document_record_test_or_benchmark_holds_a_machine_path():
    files = [ROOT / "README.md", ROOT / "utils.py", ROOT / "model.py", *ROOT.glob("doc/*.md"),
             *ROOT.glob("doc/results/**/*.json*"), *ROOT.glob("benchmarks/*"), *ROOT.glob("tests/*.py")]
    found = {str(p.relative_to(ROOT)): machine_paths(p.read_text()) for p in files if p.is_file()}
    assert {k: v for k, v in found.items() if v and k != "tests/test_portability.py"} == {}
    assert machine_paths("data: ../shared/data/x.tar.gz, /work/main/.gpu/x") != []     # the check sees them
    assert "../shared/data/cifar10-jpeg.tar.gz" in (ROOT / ".ci" / "run").read_text()


def test_history_is_cited_by_a_commit_of_main_not_a_tag(load_benchmark):
    commit = load_benchmark("records").HISTORY_COMMIT
    texts = [README, (ROOT / "benchmarks" / "records.py").read_text()]
    texts += [p.read_text() for p in ROOT.glob("doc/*.md")]
    assert not any("trials-final" in t or "git tag" in t for t in texts)
    assert all(commit[:12] in t for t in (README, (ROOT / "doc" / "tuning.md").read_text()))
    is_repo = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode == 0
    if not is_repo:
        pytest.skip("not a git checkout: the commit cannot be looked up")
    found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
    assert found.returncode == 0, f"commit {commit} is not in this clone's history (a shallow clone?)"


def setup_cell():
    cells = json.loads((ROOT / "S8_BatchNorm.ipynb").read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def run_in_ipython(source):
    """Run a cell's source as Jupyter does, magics included; returns the shell's result."""
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    try:
        return shell.run_cell(source)
    finally:
        InteractiveShell.clear_instance()


@pytest.fixture
def in_colab(monkeypatch):
    """google.colab imported, as it is in Colab."""
    import types
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))


def test_the_setup_cell_in_colab_clones_the_repository_and_changes_into_it(tmp_path, monkeypatch, in_colab,
                                                                           load_benchmark):
    source = tmp_path / "published"
    subprocess.run(["git", "clone", "-q", f"file://{ROOT}", str(source)], check=True)
    repo_url = load_benchmark("notebooks").REPO_URL
    cell = setup_cell()
    assert cell.count(repo_url) == 1                         # the one constant a publisher sets
    colab = tmp_path / "content"
    colab.mkdir()
    monkeypatch.chdir(colab)
    result = run_in_ipython(cell.replace(repo_url, f"file://{source}"))
    result.raise_error()
    assert Path.cwd() == colab / "s8-normalization"
    where = "import model, utils; print(model.__file__, utils.__file__)"
    imported = subprocess.run([sys.executable, "-c", where], capture_output=True, text=True, cwd=Path.cwd())
    assert imported.returncode == 0, imported.stderr
    assert all(Path(f).parent == colab / "s8-normalization" for f in imported.stdout.split())


def test_the_setup_cell_outside_colab_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.chdir(tmp_path)
    result = run_in_ipython(setup_cell())
    result.raise_error()
    assert Path.cwd() == tmp_path and list(tmp_path.iterdir()) == []
