"""binder/: the lab starts on Binder or any repo2docker-based hub with no extra step, CPU torch.

repo2docker cannot run here (no Docker, no download.pytorch.org), so these check what can be
checked without it: that binder/ holds only files repo2docker reads the way we mean, that it
installs torch's CPU build at pyproject.toml's exact pin and every runtime dependency of the lab,
that runtime.txt's Python is one the lab allows, and that postBuild is valid bash that does its
job when run as repo2docker runs it (from the repository root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The files repo2docker reads from binder/ that the lab uses. Others (environment.yml, Pipfile,
# Dockerfile, ...) would change which build pack repo2docker picks.
EXPECTED_FILES = {"requirements.txt", "runtime.txt", "postBuild"}
# Pythons repo2docker builds (repo2docker/buildpacks/conda/supported_python_version.py).
REPO2DOCKER_PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def parse_requirements(text: str) -> dict:
    """A requirements file's index options, named requirements and local paths (pip's syntax)."""
    out: dict = {"index_urls": [], "requirements": [], "local": []}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        option = re.fullmatch(r"(--(?:extra-)?index-url)[ =](\S+)", line)
        if option:
            out["index_urls"].append((option.group(1), option.group(2)))
        elif line.startswith(("-e ", "--editable ", ".", "/")):
            out["local"].append(line.split(None, 1)[-1] if line.startswith("-") else line)
        elif line.startswith("-"):
            raise ValueError(f"an option these tests do not know: {line!r}")
        else:
            out["requirements"].append(Requirement(line))
    return out


def unmet_dependencies(requirements_text: str, root: Path = ROOT) -> list[str]:
    """pyproject.toml's runtime dependencies that a requirements file, run from root, leaves out.

    A local path that is this project installs every dependency with pyproject's own specifiers;
    otherwise each needs a requirement of its name. Either way a requirement of the same name
    must allow a version that pyproject allows too (an exact pin must lie inside it).
    """
    parsed = parse_requirements(requirements_text)
    name = pyproject()["project"]["name"]
    installs_project = any(
        (root / p).resolve() == root.resolve() and (root / p / "pyproject.toml").is_file()
        for p in parsed["local"]
    )
    given = {canonicalize_name(r.name): r for r in parsed["requirements"]}
    unmet = []
    for dep in map(Requirement, pyproject()["project"]["dependencies"]):
        mine = given.get(canonicalize_name(dep.name))
        if mine is None:
            if not installs_project:
                unmet.append(f"{dep} (not installed: neither listed nor the {name} project)")
            continue
        pins = [Version(s.version) for s in mine.specifier if s.operator == "=="]
        if pins and not all(dep.specifier.contains(v, prereleases=True) for v in pins):
            unmet.append(f"{dep} (binder pins {mine.specifier})")
    return unmet


@pytest.fixture(scope="module")
def binder_requirements() -> dict:
    return parse_requirements((BINDER / "requirements.txt").read_text())


def test_binder_holds_only_the_files_the_lab_means_repo2docker_to_read():
    assert {p.name for p in BINDER.iterdir()} == EXPECTED_FILES
    assert not (ROOT / ".binder").exists()  # repo2docker refuses both binder/ and .binder/


def test_torch_is_pinned_exactly_as_pyproject_pins_it(binder_requirements):
    deps = [Requirement(d) for d in pyproject()["project"]["dependencies"]]
    [torch_dep] = [d for d in deps if d.name == "torch"]
    pins = [r for r in binder_requirements["requirements"] if r.name == "torch"]
    assert len(pins) == 1, f"binder/requirements.txt should name torch once, got {pins}"
    assert str(pins[0].specifier) == str(torch_dep.specifier) == "==2.13.0"
    assert not pins[0].marker and not pins[0].url


def test_torch_comes_from_pytorchs_cpu_index(binder_requirements):
    # An extra index: the CPU wheel (2.13.0+cpu) sorts above PyPI's 2.13.0, the rest stays PyPI's.
    assert binder_requirements["index_urls"] == [("--extra-index-url", CPU_INDEX)]


def test_every_runtime_dependency_of_pyproject_is_installed(binder_requirements):
    assert unmet_dependencies((BINDER / "requirements.txt").read_text()) == []
    # The lab itself, from the repository root, which is where repo2docker runs pip.
    assert binder_requirements["local"] == ["."]


def test_the_dependency_check_finds_what_a_requirements_file_leaves_out():
    """The check above can fail: without the project, each dependency must be listed."""
    unmet = unmet_dependencies("torch==2.13.0\nnumpy==2.1.0\n")
    names = [u.split(None, 1)[0] for u in unmet]
    assert not any(n.startswith(("torch", "numpy")) for n in names)
    assert any(n.startswith("matplotlib") for n in names) and len(unmet) == len(
        pyproject()["project"]["dependencies"]
    ) - 2  # fmt: skip
    # pip resolves the path from where it runs (the root), not from binder/: `..` is wrong.
    assert len(unmet_dependencies("-e ..\n")) == len(pyproject()["project"]["dependencies"])
    assert unmet_dependencies("-e .\nnumpy==1.26.4\n") == ["numpy<3,>=2.0 (binder pins ==1.26.4)"]


def test_runtime_txt_names_a_python_the_lab_allows():
    text = (BINDER / "runtime.txt").read_text()
    match = re.fullmatch(r"python-(3\.\d+)\n?", text)
    assert match, f"runtime.txt should be 'python-3.X', got {text!r}"
    version = match.group(1)
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert requires.contains(version), f"{version} is outside requires-python {requires}"
    assert version in REPO2DOCKER_PYTHONS


def test_postbuild_is_an_executable_bash_script_that_stops_on_errors():
    post = BINDER / "postBuild"
    assert os.access(post, os.X_OK)
    text = post.read_text()
    assert text.startswith("#!/bin/bash\n")
    commands = [line for line in text.splitlines() if line.strip() and line[0] != "#"]
    assert commands[0] == "set -euo pipefail"  # before anything that could fail
    check = subprocess.run(["bash", "-n", str(post)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # The executable bit is committed, not only set in this checkout.
    staged = subprocess.run(
        ["git", "ls-files", "-s", "binder/postBuild"], cwd=ROOT, capture_output=True, text=True
    )
    if staged.stdout:  # a git checkout (an exported copy has no index)
        assert staged.stdout.startswith("100755 "), staged.stdout


def test_postbuild_installs_the_labs_jupyterlab_defaults(tmp_path):
    """Run as repo2docker runs it (from the repository root), into a temporary JupyterLab dir."""
    app_dir = tmp_path / "jupyterlab-app"
    bin_dir = Path(sys.executable).parent  # python and jupyter, as on repo2docker's PATH
    assert shutil.which("jupyter", path=str(bin_dir)), f"no jupyter beside {sys.executable}"
    env = {**os.environ, "JUPYTERLAB_DIR": str(app_dir), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(BINDER / "postBuild")], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if torch.version.cuda is not None:  # this machine has a CUDA build: postBuild refuses it
        assert proc.returncode != 0 and "is a CUDA build" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("LoRA Lab ") and torch.__version__ in proc.stdout
    written = app_dir / "settings" / "overrides.d" / "lora-lab.json"
    shipped = ROOT / "notebooks" / ".jupyter" / "lab" / "settings" / "overrides.json"
    assert json.loads(written.read_text()) == json.loads(shipped.read_text())
    # JupyterLab reads it from there (its app_settings_dir is <app dir>/settings).
    from jupyterlab_server.settings_utils import _get_overrides

    overrides, error = _get_overrides(str(app_dir / "settings"))
    assert not error
    assert overrides["@jupyterlab/apputils-extension:notification"]["checkForUpdates"] is False
