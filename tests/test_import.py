"""lab/__init__.py: `import lab` changes nothing in the process and loads the engine only on use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lab

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip


def test_import_lab_leaves_threads_environment_and_folder_as_they_were():
    code = (
        "import os, torch; n = torch.get_num_threads(); env = dict(os.environ); cwd = os.getcwd()\n"
        "import lab\n"
        "assert torch.get_num_threads() == n, f'threads {n} -> {torch.get_num_threads()}'\n"
        "keys = set(env) | set(os.environ)\n"
        "changed = sorted(k for k in keys if env.get(k) != os.environ.get(k))\n"
        "assert not changed, f'os.environ changed: {changed}'\n"
        "assert os.getcwd() == cwd\n"
    )
    # The lab's thread rule would pick 1 thread under JupyterHub: the import must not apply it.
    for extra in ({}, {"JUPYTERHUB_USER": "ann"}, {"LORA_LAB_THREADS": "1"}):
        done = run(code, **{"OMP_NUM_THREADS": "", "LORA_LAB_THREADS": "", **extra})
        assert done.returncode == 0, (extra, done.stderr.strip().splitlines()[-1:])


# One new process, in stages, each looked at before the next imports more: what `import lab`
# loads, what the core modules load, what using a public name loads, and every public name.
STAGES = """
import json, sys
seen = {}
import lab
seen["engine_after_import"] = sorted(
    m for m in sys.modules if m == "lab.training" or (m.startswith("lab.") and "sweep" in m))
import lab.lora, lab.model, lab.config
# The modules the core must not pull in: the sweep engine, the notebook UI, the course.
words = ("sweep", "executor", "calibrat", "widget", "exercise", "course", "plots", "explorer")
seen["beyond_the_core"] = sorted(
    m for m in sys.modules if m.split(".")[0] in ("ray", "matplotlib", "ipywidgets")
    or (m.startswith("lab.") and any(w in m for w in words)))
lab.sweep, lab.train
seen["training_after_use"] = "lab.training" in sys.modules
names = [name for name in lab.__all__ if name != "threads"]
exec(f"from lab import {', '.join(names)}, threads")
seen["public_names_imported"] = True  # no ImportError above
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def stages() -> dict:
    done = run(STAGES)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_public_name_loads_its_module_only_when_used(stages):
    assert stages["engine_after_import"] == []  # import lab alone: no engine, no training loop
    assert stages["training_after_use"]  # lab.sweep and lab.train loaded what they need


def test_the_core_imports_none_of_the_engine_the_ui_or_the_course(stages):
    assert stages["beyond_the_core"] == [], "importing the core pulls in: " + " ".join(
        stages["beyond_the_core"]
    )


def test_every_public_name_imports_and_dir_lists_them(stages):
    assert stages["public_names_imported"]  # `from lab import` each of them, in a new process
    assert set(lab.__all__) <= set(dir(lab))
    assert all(getattr(lab, name) is not None for name in lab.__all__)


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="module 'lab' has no attribute 'add_lorra'"):
        lab.add_lorra  # noqa: B018
