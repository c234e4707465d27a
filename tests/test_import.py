"""lab/__init__.py: `import lab` changes nothing in the process and loads the engine only on use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lab

ROOT = Path(__file__).resolve().parents[1]

# The modules the core must not pull in: the sweep engine, the notebook UI, the course.
NOT_CORE = (
    "import sys, lab.lora, lab.model, lab.config\n"
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'matplotlib', 'ipywidgets')"
    " or (m.startswith('lab.') and any(w in m for w in ('sweep', 'executor', 'calibrat', 'widget',"
    " 'exercise', 'course', 'plots', 'explorer'))))\n"
    "print(' '.join(bad)); sys.exit(1 if bad else 0)\n"
)


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


def test_the_core_imports_none_of_the_engine_the_ui_or_the_course():
    done = run(NOT_CORE)
    assert done.returncode == 0, "importing the core pulls in: " + (done.stdout or done.stderr)


def test_every_public_name_imports_and_dir_lists_them():
    names = [name for name in lab.__all__ if name != "threads"]
    code = f"from lab import {', '.join(names)}, threads; import lab; print(len(dir(lab)))"
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert set(lab.__all__) <= set(dir(lab))
    assert all(getattr(lab, name) is not None for name in lab.__all__)


def test_a_public_name_loads_its_module_only_when_used():
    done = run(
        "import sys, lab\n"
        "engine = [m for m in sys.modules if m.startswith('lab.') and 'sweep' in m]\n"
        "assert not engine and 'lab.training' not in sys.modules, engine\n"
        "lab.sweep, lab.train\n"
        "assert 'lab.training' in sys.modules\n"
        "print('ok')\n"
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="module 'lab' has no attribute 'add_lorra'"):
        lab.add_lorra  # noqa: B018
