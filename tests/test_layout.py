"""The map stays true: every path the docs name exists, tests mirror lab/'s subpackages (the
folder named for a subpackage tests its modules, its public face and what they share), and the
root conftest's list of the longest test files names files that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A path from the checkout's root: not the tail of a longer one (~/.cache/lora-lab/...).
PATH = re.compile(r"(?<![\w./~-])((?:lab|tests|benchmarks|scripts)/[\w/]+\.(?:py|json|md|cfg))\b")
# A subpackage's public face lives at the top of lab/ and is tested in the subpackage's folder.
FACES = {"diagnostics": "diagnosis", "explorer": "widgets"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_a_doc_names_exists(doc):
    missing = sorted({p for p in PATH.findall(doc.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_tests_mirror_the_subpackages_of_lab():
    subpackages = {p.parent.name for p in (ROOT / "lab").glob("*/__init__.py")}
    expected = {"engine", "quant", "plots", "exercises", "variants", "diagnostics", "explorer"}
    assert expected <= subpackages
    missing = sorted(name for name in subpackages if not (ROOT / "tests" / name).is_dir())
    assert not missing, f"lab/ subpackages without a tests/ folder: {missing}"
    for name in subpackages:  # each folder's tests are for modules of that subpackage
        modules = {p.stem for p in (ROOT / "lab" / name).glob("*.py")}
        known = modules | {name, FACES.get(name)}
        strays = [t.name for t in (ROOT / "tests" / name).glob("test_*.py")
                  if t.stem.removeprefix("test_") not in known]  # fmt: skip
        assert not strays, f"tests/{name}/ holds tests of no lab/{name}/ module: {strays}"


def test_the_longest_test_files_listed_first_exist():
    # Read from the file, not imported: importing it again would redo its environment set-up.
    tree = ast.parse((ROOT / "conftest.py").read_text())
    listed = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "LONGEST_FIRST" for t in node.targets)
    )
    assert listed, "conftest.LONGEST_FIRST is empty"
    missing = [p for p in listed if not (ROOT / p).is_file()]
    assert not missing, f"conftest.LONGEST_FIRST names files that do not exist: {missing}"


def test_xdist_hands_out_files_in_the_collections_order(tmp_path):
    """pytest-xdist's `--dist loadfile` hands out the files with the most tests first unless told
    not to; the root conftest tells it not to, so the order LONGEST_FIRST gives is the order the
    workers get. Checked on two files where the two orders differ."""
    import subprocess
    import sys

    root_conftest = str(ROOT / "conftest.py")
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('root_conftest', {root_conftest!r})\n"
        "root = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(root)\n"
        "pytest_configure = root.pytest_configure\n"
        "def pytest_collection_modifyitems(items):\n"
        "    items.sort(key=lambda item: item.path.name != 'test_one.py')  # the short file first\n"
    )
    (tmp_path / "test_many.py").write_text(
        "import pytest\n@pytest.mark.parametrize('i', range(5))\ndef test_many(i): pass\n"
    )
    (tmp_path / "test_one.py").write_text("def test_one(): pass\n")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "1", "--dist", "loadfile", "-v", "-p", "no:randomly",
         "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    ran = [line for line in out.splitlines() if "PASSED" in line and "::test_" in line]
    assert len(ran) == 6, out
    assert "test_one.py::test_one" in ran[0], ran
