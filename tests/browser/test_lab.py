"""The walkthrough in a real JupyterLab, driven by headless Chromium.

Every notebook (but 04, which test_hub.py runs for two students at once) runs top to bottom
through the Run menu and ends with every code cell executed and no error output, and what its
kernel printed and displayed matches the stored outputs as strict nbval compares them (recorded
from the kernel beside the browser: kernel_outputs.py); the root conftest then leaves these
notebooks out of nbval's own run, so each runs once. The sweep explorer in notebook 05 answers a
control change and a Run with a new plot and a status line that says the point is now cached.
"""

from __future__ import annotations

import time

import nbformat
import pytest
from kernel_outputs import KernelRecorder, cell_runs, differences
from nbformat.v4 import new_code_cell, new_notebook
from needs import browser_missing
from pages import (
    FAST_STEPS,
    PANEL,
    WIDGET_OUTPUT,
    Explorer,
    check_ran_clean,
    execution_counts,
    expect,
    find_errors,
    layout_problems,
    open_notebook,
    run_all_cells,
    screenshot_widgets,
    stray_reprs,
    train_one_point,
)
from servers import NOTEBOOKS, ROOT

pytestmark = pytest.mark.browser

SWEEPS = "05_sweeps.ipynb"  # run by test_sweep_explorer_in_jupyterlab, which also drives it
# The fine-tuning walkthrough runs in test_hub.py instead: two students' JupyterLabs behind a
# hub run it at once, with the same checks as run_clean (every cell ran, no error output,
# nothing printed as a stray repr).
IN_THE_HUB_TEST = "04_fine_tuning.ipynb"
WALKTHROUGH = [p.name for p in sorted(NOTEBOOKS.glob("0*.ipynb"))]
SANITIZE = ROOT / "tests" / "nbval" / "sanitize.cfg"  # nbval's, named in pyproject.toml


def can_run() -> bool:
    """Whether this file's tests run here (else they skip, or fail under CI=true)."""
    return not browser_missing()


def checked_by(item: pytest.Item) -> str | None:
    """The notebook (its path from the root) that a test of this file runs in JupyterLab and
    compares with its stored outputs, for the root conftest; None for the other tests."""
    if item.originalname == "test_sweep_explorer_in_jupyterlab":
        return f"notebooks/{SWEEPS}"
    if item.originalname == "test_walkthrough_notebook_runs_clean":
        return f"notebooks/{item.callspec.params['name']}"
    return None


@pytest.fixture(autouse=True)
def one_kernel_at_a_time(lab_server):
    """Shut each test's kernels down after it: idle kernels hold memory that others need."""
    yield
    lab_server.shutdown_sessions()


def run_clean(page, server, name, shots, timings) -> None:
    """Open notebooks/<name>, Run All Cells, and check: every cell ran, no error, no stray repr,
    and the kernel's outputs match the stored ones as strict nbval compares them."""
    start = time.perf_counter()
    open_notebook(page, server, f"notebooks/{name}")
    opened = time.perf_counter() - start
    recorder = KernelRecorder(server.connection_file(f"notebooks/{name}")).start()
    try:
        seconds = run_all_cells(page)
    finally:
        runs = cell_runs(recorder.stop())
    timings(f"JupyterLab: open {name}", opened)
    timings(f"JupyterLab: run all {name}", seconds)
    stem = name.removesuffix(".ipynb")
    page.screenshot(path=shots / f"lab-{stem}.png")
    check_ran_clean(page, name)
    problems = differences(NOTEBOOKS / name, runs, SANITIZE)
    assert not problems, f"{name} in JupyterLab, against its stored outputs:\n" + "\n".join(
        problems
    )
    screenshot_widgets(page, shots, f"lab-{stem}")
    for message in getattr(page, "page_errors", []):
        print(f"{name}: {message}")


def test_shipped_settings_turn_off_the_news_pop_up(lab_server):
    """The README's command points JupyterLab at notebooks/.jupyter: no news, no update check."""
    reply = lab_server.api("GET", "/lab/api/settings/@jupyterlab/apputils-extension:notification")
    defaults = {k: v.get("default") for k, v in reply["schema"]["properties"].items()}
    assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False
    assert not reply.get("raw", "").strip("{} \n")  # no user setting needed: the shipped default


def test_error_outputs_are_seen_and_progress_bars_are_not(lab_server, page, shots):
    """The error check itself: an exception is found, tqdm and warnings on stderr are not."""
    probe = lab_server.base / "root" / "probe" / "errors.ipynb"
    probe.parent.mkdir(parents=True, exist_ok=True)
    nb = new_notebook(
        cells=[
            new_code_cell("from tqdm import tqdm\nfor _ in tqdm(range(3)):\n    pass"),
            new_code_cell("import warnings\nwarnings.warn('just a warning')"),
            new_code_cell("import sys\nprint('RuntimeWarning-free stderr text', file=sys.stderr)"),
            new_code_cell("raise ValueError('boom from the probe')"),
            new_code_cell("print('never runs')"),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    nbformat.write(nb, probe)
    open_notebook(page, lab_server, "probe/errors.ipynb")
    run_all_cells(page, timeout_ms=120_000)
    stderr = page.locator(
        f"{PANEL} .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
    )
    expect(stderr).to_have_count(4)  # tqdm, the warning, the print and the error
    errors = find_errors(page, PANEL)
    assert len(errors) == 1 and "ValueError" in errors[0] and "boom" in errors[0], errors
    assert execution_counts(page)[-1] == "[ ]:"  # Run All stops at the error
    page.screenshot(path=shots / "lab-probe-errors.png")


@pytest.mark.parametrize("name", [n for n in WALKTHROUGH if n not in (SWEEPS, IN_THE_HUB_TEST)])
def test_walkthrough_notebook_runs_clean(name, lab_server, page, shots, timings):
    run_clean(page, lab_server, name, shots, timings)


def test_sweep_explorer_in_jupyterlab(lab_server, page, shots, timings):
    """Notebook 05 runs clean; then a control change and Run train one point and redraw."""
    assert SWEEPS in WALKTHROUGH
    run_clean(page, lab_server, SWEEPS, shots, timings)
    root = page.locator(f"{PANEL} {WIDGET_OUTPUT}")
    expect(root).to_have_count(1)
    explorer = Explorer(root)
    explorer.check_structure()
    expect(explorer.status).to_contain_text("22 points selected, 22 cached, 0 to train")
    root.evaluate("e => e.scrollIntoView({block: 'start'})")
    # Controls and tab titles must fit next to JupyterLab's file browser, and the plots must
    # stay put while Run trains (the progress log sits below them).
    problems = layout_problems(root, page.viewport_size["width"])
    assert not problems, problems
    seconds = train_one_point(explorer, shots, "lab-05_sweeps")
    timings("JupyterLab: set the explorer's controls", seconds["controls"])
    timings(f"JupyterLab: Run (1 point, {FAST_STEPS} steps)", seconds["run"])
    assert not find_errors(page, PANEL)
    assert not stray_reprs(root.inner_text()), stray_reprs(root.inner_text())
