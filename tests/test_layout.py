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
